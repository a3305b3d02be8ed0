"""`TrainConfig`: every knob of a training run, validated at construction.

Names follow TRL's `DPOConfig` / `TrainingArguments` where the concept is the same, so a TRL user's
YAML mostly carries over.

Construction runs in order: `_normalise` (the spellings YAML, flags and TRL give become each field's
own form), the type check, each field's own rule (declared with the field: `epsdpo.config_fields`,
whose words end the field's help), then `CHECKS`, the named checks of a value's form and of several
fields together, and last the aliases resolved (torch_dtype into dtype, padding_free into layout).
Every refusal is a `ConfigFieldError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from epsdpo._core import LAYOUTS, Truncation
from epsdpo.config_fields import ConfigFieldError, UnknownConfigKeysError, check_allowed, integer, number, one_of, rule_of
from epsdpo.methods import METHOD_NAMES, method_class
from epsdpo.safe_yaml import load_config_yaml, shown

REPORTER_ALONE = ("jsonl", "none", "all")
REPORTER_BACKENDS = ("tensorboard", "wandb", "trackio", "mlflow")
REPORTERS = REPORTER_ALONE + REPORTER_BACKENDS
# The smallest β (and beta_min) accepted. Every pair's gradient is β·σ(−β·gap) ≤ β times the gradient
# of its log-ratio gap, so below this the per-weight gradients sit near AdamW's ε (1e-8) or under it
# and the run trains little or nothing; four orders of magnitude below any β in use (TRL's default
# 0.1, the paper's 0.01–0.5), so no real setting is refused.
MIN_BETA = 1e-6

# The methods of epsdpo.methods' registry: adding one there adds it here
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]
# The Rust collator's layouts (epsdpo._core.LAYOUTS): adding one there adds it here
Layout = Literal[LAYOUTS]  # type: ignore[valid-type]

# The largest value of any integer field (and of the step and epoch counts given as floats): the Rust core
# and torch hold these as 32- or 64-bit integers, so a larger one would fail deep inside them, unnamed.
MAX_INT = 2**31 - 1
# Device types a run can train on; anything else torch.device parses (meta, ...) holds no real data.
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
CHAT_TEMPLATE_SUFFIXES = (".jinja", ".j2")  # what TRL reads as a template file rather than a tokenizer
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")  # transformers' names of the one optimizer implemented
# Fields that hold a mapping, or its JSON string as a command line gives it (TRL's `dict | str` fields)
MAPPING_FIELDS = ("lr_scheduler_kwargs", "gradient_checkpointing_kwargs", "model_init_kwargs")


@dataclass
class TrainConfig:
    """Every knob of a training run. A field named like one of TRL's `DPOConfig` / `TrainingArguments`
    means the same there; `epsdpo train --help` lists them all with their help."""

    output_dir: str = field(default="outputs/epsdpo", metadata={"help": (
        "Directory for checkpoints, final/ (the trained model), metrics.jsonl, beta_ledger.npz and plots/ "
        "(TRL's meaning).")})
    # ε-DPO (docs/algorithm.md, 'The step rule')
    method: MethodName = field(default="epsilon_dpo", metadata={"help": (
        "Training rule: epsilon_dpo (β adapts per pair and per step), dpo (fixed β), tr_dpo (fixed β; the "
        "reference moves toward the policy), beta_dpo (one β per batch) or ipo (IPO's squared loss at a fixed "
        "β, with loss_type=ipo). See docs/algorithm.md.")})
    beta: float = number(0.1, (
        "KL penalty β of the DPO loss (TRL's beta). For epsilon_dpo the initial base β, which then "
        "adapts; for beta_dpo the base β₀."), low=MIN_BETA, note=" (a smaller β trains nothing)")
    beta_min: float | None = number(None, (
        "Opt-in floor under ε-DPO's base β: after each optimizer step β becomes max(β/(1 + ε·mean s), "
        "beta_min). None (the default) is the paper's rule, under which β can shrink toward 0 and training "
        "stop; a floor is a departure from the paper (docs/algorithm.md). At most beta."), low=MIN_BETA)
    epsilon: float = number(0.01, (
        "ε-DPO step size ε_s: a pair trains with β/(1 + ε·s), s in {-1, 0, +1}, and after each "
        "optimizer step the base β becomes β/(1 + ε·mean s). 0 trains exactly as DPO. Used only by "
        "method=epsilon_dpo."), low=0, high=1, high_open=True)
    epsilon_check: float | None = number(None, (
        "ε_c, the size of the perturbation that decides each pair's step s, when it should differ from the "
        "step size epsilon (the paper's ε_c/ε_s ablation). None: use epsilon for both."), low=0, high=1, high_open=True)
    cdpo_smoothing: float = number(0.0, (
        "Conservative DPO (cDPO) smoothing: the assumed probability that a pair's preference is "
        "flipped; each pair's loss becomes (1 − e)·(−log σ(m)) − e·log σ(−m) for its margin m. 0: none, the "
        "plain sigmoid loss. TRL 1.16 has no such option (its label_smoothing is ignored by loss_type=sigmoid)."),
        low=0, high=0.5, high_open=True)
    label_smoothing: float = one_of(0.0, (
        "Accepted only as 0, so that TRL configs (which spell out its default) run: TRL 1.16's default "
        "loss_type=sigmoid ignores it, and its robust/EXO meanings are other losses."), 0,
        note=" (TRL's sigmoid loss ignores it); for conservative DPO smoothing set cdpo_smoothing")
    loss_type: str | list[str] = field(default="sigmoid", metadata={"help": (
        "TRL's loss choice, one name (or a list of one): sigmoid, the DPO loss every method but ipo trains "
        "with, or ipo, with method=ipo. TRL's plain DPO (loss_type=sigmoid) is method=dpo and its IPO "
        "(loss_type=ipo) is method=ipo; TRL's other loss types are not implemented.")})
    # baselines (epsdpo.baselines): TR-DPO soft reference update, β-DPO batch β and data filter
    sync_ref_model: bool = field(default=False, metadata={"help": (
        "TR-DPO's soft update of the reference toward the policy every ref_model_sync_steps steps (TRL's "
        "meaning). method=tr_dpo is DPO with this on; other methods may use it too.")})
    ref_model_sync_steps: int = integer(512, (
        "Optimizer steps between soft updates of the reference (TRL's meaning and default; the TR-DPO "
        "paper's HH runs used 128)."))
    ref_model_mixup_alpha: float = number(0.6, (
        "Weight α of the policy in the soft update θ_ref ← α·θ + (1 − α)·θ_ref (TRL's meaning and "
        "default)."), low=0, low_open=True, high=1)
    beta_dpo_alpha: float = number(0.6, (
        "β-DPO: scale a of the batch β = β₀·(1 + a·(M − M₀)), M the batch's mean implicit reward gap "
        "and M₀ its running mean. Used only by method=beta_dpo."), low=0)
    beta_dpo_momentum: float = number(0.9, (
        "β-DPO: momentum m of the running mean gap, M₀ ← m·M₀ + (1 − m)·M. Used only by "
        "method=beta_dpo."), low=0, high=1, high_open=True)
    beta_dpo_filter: float | None = number(None, (
        "β-DPO data filter: train only on this fraction ρ of each batch, the pairs whose gaps lie "
        "closest to M₀. None: no filter. Used only by method=beta_dpo."), low=0, low_open=True, high=1)
    # optimisation
    learning_rate: float = number(1e-6, "Peak learning rate of AdamW (TRL's meaning and DPOConfig default).", low=0)
    optim: str = one_of("adamw_torch", (
        "Optimizer, by transformers' name: adamw_torch (torch's AdamW) or adamw_torch_fused (the same update in "
        "one fused kernel per step, TRL's default). AdamW is the one optimizer implemented; other names are "
        "refused. Default adamw_torch, unlike TRL: the fused kernel is opt-in."), *OPTIMIZERS,
        note=": AdamW is the one optimizer implemented")
    adam_epsilon: float = number(1e-8, "AdamW ε (TRL's meaning and default).", low=0, low_open=True)
    per_device_train_batch_size: int = integer(8, (
        "Preference pairs per micro-batch on each process (TRL's meaning and default). With "
        "max_tokens_per_batch it only sizes the length-grouping windows."))
    per_device_eval_batch_size: int = integer(8, "Preference pairs per evaluation batch on each process (TRL's meaning).")
    gradient_accumulation_steps: int = integer(1, (
        "Micro-batches per optimizer step on each process (TRL's meaning). The β update happens once "
        "per optimizer step."))
    num_train_epochs: float = number(3.0, (
        "Passes over the training data, > 0 unless max_steps is set; fractions allowed. Ignored when max_steps "
        "is set (TRL's meaning and default)."), high=MAX_INT)
    max_steps: int = integer(-1, (
        "Optimizer steps to train for; -1: as many as num_train_epochs needs (TRL's meaning)."), unset=-1)
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr"] = field(
        default="linear", metadata={"help": (
            "Learning-rate schedule after warm-up (transformers' names, meaning and default). cosine_with_min_lr "
            "decays to a floor that lr_scheduler_kwargs names: min_lr (a learning rate) or min_lr_rate (a "
            "fraction of learning_rate).")})
    lr_scheduler_kwargs: dict | str | None = field(default=None, metadata={"help": (
        "Keyword arguments of the schedule, as a mapping or a JSON string (transformers' meaning), e.g. "
        "{\"num_cycles\": 1} for cosine or {\"min_lr_rate\": 0.1} for cosine_with_min_lr. A key the schedule "
        "does not take is refused. None: none.")})
    warmup_steps: float = number(0.0, (
        "Linear learning-rate warm-up from 0: a number of optimizer steps when >= 1, a fraction of the total "
        "steps when below 1, none at 0 (the default). The meaning of transformers 5 / TRL 1.16."), low=0, high=MAX_INT)
    warmup_ratio: float = number(0.0, (
        "The older spelling of a fractional warm-up: a fraction of the total optimizer steps. Set "
        "warmup_steps or warmup_ratio, not both."), low=0, high=1)
    weight_decay: float = number(0.0, (
        "AdamW weight decay, applied to weight matrices only (not to biases or norms)."), low=0)
    adam_beta1: float = number(0.9, "AdamW β1 (TRL's meaning).", low=0, high=1, high_open=True)
    adam_beta2: float = number(0.999, "AdamW β2 (TRL's meaning).", low=0, high=1, high_open=True)
    max_grad_norm: float = number(1.0, "Clip the global gradient norm to this (TRL's meaning).", low=0,
                                  note=" (0 disables clipping)")
    # data
    max_length: int | None = integer(1024, (
        "Longest sequence, prompt plus one completion, in tokens (TRL's name); a completion loses its "
        "end to fit, as under TRL's default truncation_mode=keep_start. None: no limit."), optional=True)
    truncation_mode: Literal["keep_start"] = field(default="keep_start", metadata={"help": (
        "How a sequence longer than max_length is cut (TRL's meaning): keep_start, the only value TRL 1.16 "
        "accepts, keeps its start, so the completion loses its end. A pair whose prompt alone reaches "
        "max_length has no completion left and is an error (or skipped with skip_invalid).")})
    max_prompt_length: int | None = integer(None, (
        "Longest prompt in tokens, below max_length, cut first as prompt_truncation_mode says (the "
        "name of older TRL releases; TRL 1.16 has none). None (the default): prompts are only cut by "
        "max_length, as in TRL 1.16."))
    max_completion_length: int | None = integer(None, (
        "Longest completion in tokens: chosen and rejected each keep their first max_completion_length "
        "tokens (the meaning of older TRL releases' DPOConfig; TRL 1.16's DPOConfig has none). max_length then "
        "still cuts what is left. None (the default): completions are only cut by max_length."))
    prompt_truncation_mode: Literal["keep_end", "keep_start"] = field(default="keep_end", metadata={"help": (
        "Which end of a prompt longer than max_prompt_length survives: keep_end (its last tokens, nearest "
        "the answer) or keep_start. Applies to the prompt only, and only with max_prompt_length.")})
    layout: Layout = field(default="padded", metadata={"help": (
        "Batch layout of the Rust collator: padded (one padded row per sequence, as TRL), packed (several "
        "sequences per row, little padding) or shared_prompt (a pair's prompt once, both completions after "
        "it). All give the same loss.")})
    padding_free: bool = field(default=False, metadata={"help": (
        "TRL's switch for training without padding: true sets layout=packed, which is padding-free (sequences "
        "packed into rows, attention kept within each); false leaves layout as it is.")})
    group_by_length: bool = field(default=False, metadata={"help": (
        "Batch pairs of similar length together (shuffled in windows, then sorted) to cut padding (TRL's "
        "meaning).")})
    max_tokens_per_batch: int | None = integer(None, (
        "Token budget per micro-batch: each takes as many pairs as fit (padding counted unless "
        "layout=packed), so the pair count varies. None: per_device_train_batch_size pairs per micro-batch."))
    pad_to_multiple_of: int = integer(1, (
        "Pad each batch's sequence length up to a multiple of this (e.g. 8 for tensor cores); 1: no "
        "extra padding (TRL's meaning)."))
    skip_invalid: bool = field(default=False, metadata={"help": (
        "Skip and count rows that cannot become a pair, and pairs that truncation leaves with an empty "
        "completion, instead of stopping with an error naming the first.")})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": (
        "Directory to cache tokenized raw datasets in (keyed by the data, tokenizer and truncation settings). "
        "None: the default cache ($EPSDPO_CACHE, else $XDG_CACHE_HOME/epsdpo, else ~/.cache/epsdpo); "
        "'disabled': no caching.")})
    dataset_num_proc: int | None = integer(None, (
        "Accepted so that TRL configs run (TRL's processes for dataset preprocessing); it changes "
        "nothing here: rows are tokenized in batches by the fast tokenizer, which uses its own threads."))
    # runtime
    seed: int = integer(42, "Random seed for torch and the batch sampler (TRL's meaning).", low=0, high=2**32,
                        high_open=True)
    device: str | None = field(default=None, metadata={"help": (
        "torch device to train on, e.g. cpu, cuda:1. None: this rank's CUDA device when one is visible, "
        "else the CPU.")})
    ddp_timeout: int = integer(1800, (
        "Seconds a rank waits in a collective (or for the process group to form) before it fails "
        "(transformers'/TRL's meaning and default). A peer that stops responding without "
        "dying (a hung GPU, a stalled read) then ends the job after this long instead of holding it "
        "(docs/distributed.md)."), high=MAX_INT, noun="an integer number of seconds")
    # Precision (docs/precision.md).
    tf32: bool | None = field(default=None, metadata={"help": (
        "Allow TF32 for float32 matmuls and convolutions on CUDA (transformers' meaning): true needs an "
        "Ampere or newer GPU and is refused without one; false forbids it. None: torch's setting is left "
        "as it is.")})
    dtype: Literal["float32", "bfloat16", "float16"] | None = field(default=None, metadata={"help": (
        "How the weights are stored: a model loaded from a path is loaded in it (None: float32), a model "
        "object is cast to it (None: kept as given). Trained weights must be float32, because an AdamW "
        "update at DPO's learning rates is smaller than half a bf16 ulp of the weight and rounds away; a "
        "frozen reference may be stored in any precision. See docs/precision.md.")})
    bf16: bool = field(default=False, metadata={"help": (
        "Compute in bfloat16: autocast over the float32 weights (TRL's meaning). Not with fp16. Default false, "
        "unlike TRL (true unless fp16): TRL assumes a GPU with bf16, while here bf16 is opt-in so that a run "
        "computes in float32 unless asked.")})
    fp16: bool = field(default=False, metadata={"help": (
        "Compute in float16: autocast over the float32 weights, with a gradient scaler (TRL's meaning). Not "
        "with bf16.")})
    torch_dtype: Literal["float32", "bfloat16", "float16"] | None = field(default=None, metadata={"help": (
        "The older spelling of dtype (transformers 4's from_pretrained argument), with its meaning; set one "
        "of the two, or both to the same value.")})
    # model loading and LoRA adapters (TRL's ModelConfig)
    model_init_kwargs: dict | str | None = field(default=None, metadata={"help": (
        "Keyword arguments for from_pretrained when the model (and ref_model) are given as paths, as a mapping "
        "or a JSON string, e.g. {\"attn_implementation\": \"eager\"} (TRL's meaning). Not dtype: see dtype.")})
    trust_remote_code: bool = field(default=False, metadata={"help": (
        "Allow loading models and tokenizers that ship their own Python code from the hub (TRL's meaning and "
        "default). Passed to from_pretrained only when true.")})
    attn_implementation: str | None = field(default=None, metadata={"help": (
        "Attention implementation of a model loaded from a path, e.g. sdpa, eager, flash_attention_2 (TRL's "
        "ModelConfig meaning), passed to from_pretrained. None: transformers' choice.")})
    model_revision: str | None = field(default=None, metadata={"help": (
        "Branch, tag or commit of a hub model (and its tokenizer) to load (TRL's ModelConfig meaning), passed "
        "to from_pretrained as revision. None: the default branch, as TRL's main.")})
    use_peft: bool = field(default=False, metadata={"help": (
        "Train LoRA adapters instead of the whole model (TRL's ModelConfig meaning); the reference is then the "
        "base model with the adapters off, so no copy of the weights is made.")})
    lora_r: int = integer(16, "LoRA rank (TRL's default).")
    lora_alpha: int = integer(32, "LoRA scaling α (TRL's default).")
    lora_dropout: float = number(0.05, "Dropout on the LoRA input (TRL's default).", low=0, high=1, high_open=True)
    # Also holds one string (all-linear, a pattern), as TRL's field of the same annotation does: `str | list[str]`
    # would make HfArgumentParser read the flag as one word, not a list of names.
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": (
        "Module names LoRA adapts, e.g. q_proj v_proj, or one string in PEFT's meaning: all-linear (every "
        "linear layer but the output head) or a regular expression the full module name must match. None: "
        "PEFT's default for the architecture (TRL's meaning; a one-name list is that string, as in TRL).")})
    chat_template_path: str | None = field(default=None, metadata={"help": (
        "A Jinja chat template file (.jinja or .j2) that replaces the tokenizer's, for conversational data whose "
        "tokenizer has none or the wrong one (TRL's SFT/reward meaning for a template file; TRL's other form, "
        "a tokenizer to clone the template and its special tokens from, is not supported). None: the "
        "tokenizer's own template.")})
    max_row_bytes: int | None = integer(None, (
        "Largest raw row of the data, in bytes (a JSON Lines line; for other sources the characters of a "
        "row's texts): a larger row is a bad row (row_too_large), an error or skipped with skip_invalid, "
        "and is never parsed or tokenized. None: 1 KiB per token of max_length, at least 1 MiB (64 MiB without "
        "max_length). See docs/data.md."))
    disable_dropout: bool = field(default=True, metadata={"help": (
        "Turn every dropout of the policy and the reference off, so that both score a sequence the same way "
        "and the implicit rewards are not noise (TRL's meaning and default).")})
    gradient_checkpointing: bool = field(default=False, metadata={"help": (
        "Recompute activations in backward instead of storing them: less memory, more compute (TRL's "
        "meaning). Default false, unlike TRL (true): the fused log-prob kernel already keeps the memory of the "
        "loss low, so the recomputation is opt-in.")})
    gradient_checkpointing_kwargs: dict | str | None = field(default=None, metadata={"help": (
        "Keyword arguments of the model's gradient_checkpointing_enable, as a mapping or a JSON string "
        "(transformers' meaning), e.g. {\"use_reentrant\": false}. None: {\"use_reentrant\": false}. Used only "
        "with gradient_checkpointing.")})
    fsdp: bool = field(default=False, metadata={"help": (
        "Under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of replicating "
        "them. A plain switch, unlike TrainingArguments.fsdp.")})
    chunk_size: int | None = integer(None, (
        "Scored token positions per chunk of the fused log-prob kernel (smaller: less memory). None: "
        "the device's default (epsdpo.ops)."))
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": (
        "Compute the reference log-probs of every training and eval pair once, before training, then release "
        "the reference model: the reference is not run during training and needs no memory (TRL's meaning). "
        "Training is the same as without it. Only where the reference is fixed and only its log-probs are "
        "needed: method=dpo or beta_dpo (or epsilon_dpo with epsilon_check 0), without sync_ref_model. "
        "Recomputed on resume.")})
    precompute_ref_batch_size: int | None = integer(None, (
        "Pairs per batch of the precomputation (TRL's meaning). None: per_device_train_batch_size for "
        "the training data, per_device_eval_batch_size for the eval data."))
    # logging, evaluation, checkpoints
    logging_strategy: Literal["steps", "epoch", "no"] = field(default="steps", metadata={"help": (
        "When training metrics are logged (TRL's meaning and default): steps (every logging_steps), epoch (at "
        "the end of each epoch) or no (never; eval metrics are still logged). steps and epoch also log the "
        "last step.")})
    logging_steps: int = integer(10, (
        "Log metrics every this many optimizer steps, and at the last step (TRL's meaning and default)."))
    logging_first_step: bool = field(default=False, metadata={"help": (
        "Also log the training metrics of the first optimizer step (TRL's meaning and default).")})
    eval_strategy: Literal["steps", "epoch", "no"] | None = field(default=None, metadata={"help": (
        "When the eval data is evaluated (TRL's meaning): steps (every eval_steps; unset, every logging_steps, "
        "as in TRL), epoch (at the end of each epoch) or no (never, not even at the end of training). Unless "
        "it is no, the eval data is also evaluated at the end of training, which TRL does only when the last "
        "step falls on eval_steps. None (the default): every eval_steps when set, and at the end.")})
    eval_steps: int | None = integer(None, (
        "Evaluate on the eval data every this many optimizer steps. None: never during training (but "
        "see eval_strategy). Ignored when eval_strategy is epoch or no, as in TRL."))
    save_strategy: Literal["steps", "epoch", "no"] | None = field(default=None, metadata={"help": (
        "When a resumable checkpoint is saved (TRL's meaning): steps (every save_steps; unset, every 500, "
        "TRL's default), epoch (at the end of each epoch) or no (never); steps and epoch also save the last "
        "step, as transformers does. None (the default): every save_steps when set, else never. The final "
        "model is saved either way. TRL's best is not supported.")})
    save_steps: int | None = integer(None, (
        "Save a resumable checkpoint (output_dir/checkpoint-STEP) every this many optimizer steps. "
        "None: none (but see save_strategy); the final model is saved either way. Ignored when save_strategy "
        "is epoch or no, as in TRL."))
    save_total_limit: int | None = integer(None, (
        "Keep at most this many checkpoints, deleting the oldest (the one just written is always "
        "kept). None: keep all (TRL's meaning)."))
    save_only_model: bool = field(default=False, metadata={"help": (
        "Checkpoints hold the model alone (weights, config, tokenizer), without the optimizer, scheduler, "
        "sampler and β state that resuming needs (transformers' meaning): smaller, and each loads with "
        "from_pretrained, but a run cannot resume from them; resuming from one is refused.")})
    metric_for_best_model: str | None = field(default=None, metadata={"help": (
        "An evaluation metric (eval_ prefix optional, e.g. loss or rewards/accuracies) whose best value is "
        "tracked in trainer_state.json's best_metric, best_global_step and best_model_checkpoint, and which "
        "transformers' EarlyStoppingCallback watches (transformers' meaning).")})
    greater_is_better: bool | None = field(default=None, metadata={"help": (
        "Whether a greater metric_for_best_model is better. None: true unless the metric's name ends in loss "
        "(transformers' default).")})
    load_best_model_at_end: bool = one_of(False, (
        "Accepted only as false: the final model is the last step's."), False, note=(
        ": the final model is the last step's; trainer_state.json's best_model_checkpoint names the best "
        "checkpoint (metric_for_best_model), which loads with from_pretrained"))
    overwrite_output_dir: bool = field(default=False, metadata={"help": (
        "A fresh run refuses an output_dir holding another run's checkpoints or metrics; true clears them "
        "first (TRL/transformers' meaning). Resuming never needs it.")})
    resume_allow_changes: list[str] | None = field(default=None, metadata={"help": (
        "Settings a resumed run may change from its checkpoint's, which then apply from the checkpoint's step "
        "on: any of max_steps (num_train_epochs), warmup_steps (warmup_ratio), learning_rate, lr_scheduler_type, "
        "lr_scheduler_kwargs, weight_decay, adam_beta1, adam_beta2, adam_epsilon, max_grad_norm. Any other training setting that differs is "
        "refused; logging, eval, save and output settings may always change (docs/resume.md).")})
    run_name: str | None = field(default=None, metadata={"help": (
        "A name for the run in the logging backends (the wandb run name). None: the backend's own choice.")})
    report_to: str | list[str] = field(default="jsonl", metadata={"help": (
        "Logging backends, each through its own library: any of tensorboard, wandb, trackio, mlflow (a list, "
        "or one name), or all (every installed one), as in TRL. metrics.jsonl in output_dir is always "
        "written, unless none. Default jsonl: that file alone.")})
    remove_unused_columns: bool = field(default=True, metadata={"help": (
        "Accepted so that TRL configs (which often set it false) run unchanged; it changes nothing here: the "
        "data loader reads only the prompt, chosen and rejected columns, whatever this says.")})
    push_to_hub: bool = one_of(False, "Accepted only as false: epsdpo uploads nothing.", False, note=(
        ": epsdpo has no hub upload; push output_dir/final with huggingface_hub's upload_folder"))
    plots: bool = field(default=True, metadata={"help": (
        "Write plots of the run (loss, β, rewards, ...) to output_dir/plots/ at the end of training.")})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar (main process only)."})

    def __post_init__(self) -> None:
        self._normalise()
        _refuse_auto_dtype(self)
        self._check_types()
        check_allowed(self)  # every field's own rule, declared with the field
        for check in CHECKS:  # a value's form, and the rules that involve several fields
            check(self)
        self._resolve_aliases()

    def _normalise(self) -> None:
        """The spellings YAML, the command line and TRL give, turned into each field's own form before
        anything is checked. Only forms it recognises are touched: a wrong value stays for the checks
        to name."""
        for name in ("logging_strategy", "eval_strategy", "save_strategy"):
            if getattr(self, name) is False:  # YAML 1.1 reads a bare `no` as false
                setattr(self, name, "no")
        if isinstance(self.resume_allow_changes, str):  # one name, as a YAML scalar
            self.resume_allow_changes = [self.resume_allow_changes]
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), _allowed_types(hints[f.name])
            if float in allowed and isinstance(value, int) and not isinstance(value, bool):
                try:
                    setattr(self, f.name, float(value))  # ints are accepted for a float field, widened
                except OverflowError:  # beyond any float: left for the type check to refuse
                    pass
            elif list[str] in allowed and isinstance(value, tuple):
                setattr(self, f.name, list(value))
        # one name as a list (what `--report_to wandb` parses to, TRL's `[sigmoid]`) is that name, as
        # TRL's ModelConfig does for lora_target_modules
        for name in ("lora_target_modules", "report_to", "loss_type"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) == 1:
                setattr(self, name, value[0])
        for name in MAPPING_FIELDS:
            self._read_mapping(name)

    def _resolve_aliases(self) -> None:
        """Two spellings of one setting become one, once the checks have shown they agree: torch_dtype
        is dtype, padding_free=True is layout='packed'."""
        if self.torch_dtype is not None:
            self.dtype = self.torch_dtype
        if self.padding_free:
            self.layout = "packed"

    def _read_mapping(self, name: str) -> None:
        """A `dict | str` field: the command line's JSON string becomes the mapping it spells."""
        value = getattr(self, name)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            # not JSON, an integer over Python's 4300 digits (ValueError), nested past the recursion limit
            except (ValueError, RecursionError) as error:
                raise ConfigFieldError(name, value, f"a JSON object ({shown(str(error))[1:-1]})") from None
            setattr(self, name, value)

    def _check_scheduler_kwargs(self) -> None:
        """lr_scheduler_kwargs names only arguments its schedule takes, and cosine_with_min_lr its floor:
        checked here, where the error names the field, not in transformers when the optimizer is built."""
        given = self.lr_scheduler_kwargs or {}
        if self.lr_scheduler_type == "cosine_with_min_lr":
            _check(("min_lr" in given) != ("min_lr_rate" in given), "lr_scheduler_kwargs", given,
                   "a mapping with min_lr or min_lr_rate (one of the two) for lr_scheduler_type=cosine_with_min_lr")
        if not given:
            return
        import inspect

        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

        function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(self.lr_scheduler_type)]
        # what get_scheduler passes itself, or the schedule's internal state
        own = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
        takes = [p for p in inspect.signature(function).parameters if p not in own]
        unknown = [k for k in given if k not in takes]
        _check(not unknown, "lr_scheduler_kwargs", given,
               f"a mapping of the arguments lr_scheduler_type={self.lr_scheduler_type} takes "
               f"({', '.join(takes) if takes else 'none'}); {', '.join(map(str, unknown))} is not one")

    def _check_device(self) -> None:
        """A device torch can name, of a kind that trains: checked here so that the error names the
        field instead of surfacing from torch at the first tensor moved. Whether this machine has it is
        `check_device_present`'s, called by the Trainer: a config for a GPU run may be written and
        checked on a machine without one."""
        if self.device is None:
            return
        import torch

        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            device = None
        _check(device is not None and device.type in DEVICE_TYPES, "device", self.device,
               "None or a torch device such as 'cpu', 'cuda' or 'cuda:1' (types: " + ", ".join(DEVICE_TYPES) + ")")

    def check_device_present(self) -> None:
        """The configured device exists on this machine (the Trainer calls this before loading
        anything); the error names the field."""
        if self.device is None:
            return
        import torch

        device = torch.device(self.device)
        if device.type == "cpu":
            return
        count = _device_count(device.type)
        _check(count > 0, "device", self.device, f"a device this machine has: torch sees no {device.type} device")
        _check(device.index is None or device.index < count, "device", self.device,
               f"a device this machine has: torch sees {count} {device.type} device(s), "
               f"{device.type}:0 to {device.type}:{count - 1}")

    def _check_method(self) -> None:
        """The loss TRL's loss_type names is the method's own, then the method's own checks."""
        _check(self.method in METHOD_NAMES, "method", self.method, "one of " + ", ".join(map(repr, METHOD_NAMES)))
        method = method_class(self.method)
        by_loss: dict[str, list[str]] = {}
        for name in METHOD_NAMES:
            by_loss.setdefault(method_class(name).loss_type, []).append(name)
        losses = "; ".join(f"{', '.join(names)}: {loss!r}" for loss, names in by_loss.items())
        _check(self.loss_type == method.loss_type, "loss_type", self.loss_type,
               f"{method.loss_type!r} for method={self.method!r}; the loss goes with the method= ({losses})")
        for holds, name, value, allowed in method.checks(self):
            _check(holds, name, value, allowed)

    def _check_precompute(self) -> None:
        """precompute_ref_log_probs replaces the reference by numbers fixed before training; refused
        where training needs the reference itself."""
        _check(not self.moves_reference, "precompute_ref_log_probs", True,
               "False when the reference moves toward the policy during training (method='tr_dpo' or "
               f"sync_ref_model=True; here method={self.method!r}, sync_ref_model={self.sync_ref_model}): its "
               "log-probs cannot be computed in advance")
        _check(self.check_epsilon == 0, "precompute_ref_log_probs", True,
               "False with method='epsilon_dpo' and a nonzero epsilon (or epsilon_check): its step rule builds "
               "the perturbed policies from the reference's logits at every step; use method='dpo' or "
               "'beta_dpo', or epsilon_check=0")

    def _check_types(self) -> None:
        """Every field against its annotation: choices for Literals, exact types for bool/int/str,
        finite numbers for floats, and no integer beyond what the Rust core and torch hold. The error
        names the field."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = _allowed_types(hints[f.name])
            or_none = " or None" if type(None) in allowed else ""
            if value is None and or_none:
                continue
            literal = next((a for a in allowed if typing.get_origin(a) is Literal), None)
            if literal is not None:
                _check(value in typing.get_args(literal), f.name, value,
                       "one of " + ", ".join(repr(c) for c in typing.get_args(literal)) + or_none)
            elif float in allowed:
                _check(isinstance(value, float) and math.isfinite(value), f.name, value, "a finite number" + or_none)
            elif dict in allowed:  # MAPPING_FIELDS, their JSON strings read by _normalise
                _check(isinstance(value, dict), f.name, value, "a mapping (or its JSON string)" + or_none)
            elif list[str] in allowed and isinstance(value, str):  # report_to, lora_target_modules: one name
                continue
            elif list[str] in allowed:
                _check(isinstance(value, list) and all(isinstance(v, str) for v in value), f.name, value,
                       "a string or a list of strings" + or_none)
            else:
                kind = next(a for a in allowed if a is not type(None))
                ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
                _check(ok, f.name, value, f"{'an integer' if kind is int else 'a ' + kind.__name__}" + or_none)
                if kind is int:
                    limit = _int_ceiling(f)
                    _check(value <= limit, f.name, value, f"an integer of at most {limit} (2**{limit.bit_length()} - 1)")

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warm-up steps of a run of `total_steps` (transformers' `get_warmup_steps`)."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(total_steps * (self.warmup_steps or self.warmup_ratio))

    def eval_every(self) -> int | None:
        """Optimizer steps between evaluations during training under eval_strategy (None: none by step)."""
        if self.eval_strategy == "steps":
            return self.eval_steps or self.logging_steps  # TRL's fallback for an unset eval_steps
        return self.eval_steps if self.eval_strategy is None else None

    def greater_is_better_resolved(self) -> bool:
        """greater_is_better, or transformers' default for metric_for_best_model: a loss is better smaller."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not (self.metric_for_best_model or "loss").endswith("loss")

    def save_every(self) -> int | None:
        """Optimizer steps between checkpoints under save_strategy (None: none by step)."""
        if self.save_strategy == "steps":
            return self.save_steps or 500  # TRL's default save_steps
        return self.save_steps if self.save_strategy is None else None

    @property
    def truncation(self) -> Truncation:
        """The four truncation settings as the one value the data path and the collator take: built
        here, passed whole, so that a truncation field is named in this file and the Rust core only."""
        return Truncation(max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                          max_completion_length=self.max_completion_length,
                          prompt_truncation_mode=self.prompt_truncation_mode)

    def model_load_kwargs(self) -> dict[str, Any]:
        """from_pretrained's keyword arguments for a model given as a path: TRL's ModelConfig fields, then
        model_init_kwargs over them (the precedence of TRL's dpo script). trust_remote_code is passed only
        when true, so that a loader never sees it unasked."""
        kwargs: dict[str, Any] = {}
        if self.model_revision is not None:
            kwargs["revision"] = self.model_revision
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        return {**kwargs, **(self.model_init_kwargs or {})}

    def tokenizer_load_kwargs(self, same_source: bool) -> dict[str, Any]:
        """The tokenizer's from_pretrained arguments: trust_remote_code, and the model's revision when the
        tokenizer comes from the model's own source (as TRL loads it)."""
        model = self.model_load_kwargs()
        keys = ("revision", "trust_remote_code") if same_source else ("trust_remote_code",)
        return {k: model[k] for k in keys if k in model}

    @property
    def moves_reference(self) -> bool:
        """Whether the reference follows the policy during training (TR-DPO's soft update)."""
        return method_class(self.method).reference_moves(self)

    @property
    def compute_dtype(self) -> str | None:
        """The autocast precision of forward passes; None runs them in the weights' own precision."""
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else None

    @property
    def step_epsilon(self) -> float:
        """ε_s of the β update β/(1 + ε·s); every method but ε-DPO keeps β fixed (ε = 0)."""
        return method_class(self.method).step_epsilon(self)

    @property
    def check_epsilon(self) -> float:
        """ε_c of the perturbed policies; 0 skips the perturbation work entirely."""
        return method_class(self.method).check_epsilon(self)

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: dict[str, Any] | None = None, *,
                  extras: dict[str, Any] | None = None) -> TrainConfig:
        """The config a YAML mapping of field names gives, `overrides` (e.g. from the command line)
        taking precedence; `path` None: `overrides` alone (a run given by flags only). `extras`: a dict
        whose keys the YAML and `overrides` may hold besides the fields (the `epsdpo train` run keys:
        model, train_data, ...); their values are written into it. Any other key is an error naming it."""
        data = {} if path is None else load_config_yaml(path) or {}  # bounded: no alias bomb, no recursion overflow
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
        data.update(overrides or {})
        extra = {} if extras is None else extras
        _refuse_unknown(data, [f.name for f in dataclasses.fields(cls)] + list(extra))
        for key in [k for k in data if k in extra]:
            extra[key] = data.pop(key)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        _refuse_unknown(data, [f.name for f in dataclasses.fields(cls)])
        hints = typing.get_type_hints(cls)
        return cls(**{k: _numeric(v, hints[k]) for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Checks of a value's form (a device, a file name, a list of backends) and of several fields together;
# each field's own bound is declared with the field (epsdpo.config_fields) and checked before these.


def _refuse_auto_dtype(c: TrainConfig) -> None:
    """TRL's ModelConfig also takes auto; said here, not as a bad choice."""
    for name in ("dtype", "torch_dtype"):
        _check(getattr(c, name) != "auto", name, "auto",
               "float32, bfloat16, float16 or None: auto would load the checkpoint's own precision, often "
               "bfloat16, and trained weights must be float32 (docs/precision.md); None loads float32")


def _dtype_spellings_agree(c: TrainConfig) -> None:
    if c.torch_dtype is not None:
        _check(c.dtype in (None, c.torch_dtype), "torch_dtype", c.torch_dtype,
               f"unset or equal to dtype ({c.dtype!r}): they are two spellings of one setting")


def _lora_targets_named(c: TrainConfig) -> None:
    _check(c.lora_target_modules is None or bool(c.lora_target_modules) and all(c.lora_target_modules),
           "lora_target_modules", c.lora_target_modules,
           "None, a module name pattern such as 'all-linear', or a non-empty list of module names")


def _chat_template_is_a_file(c: TrainConfig) -> None:
    _check(c.chat_template_path is None or c.chat_template_path.endswith(CHAT_TEMPLATE_SUFFIXES),
           "chat_template_path", c.chat_template_path,
           "None or a .jinja or .j2 template file (TRL's other form, a tokenizer to clone the template from, "
           "is not supported: save that tokenizer's chat_template to a .jinja file)")


def _reporters_known(c: TrainConfig) -> None:
    reporters = [c.report_to] if isinstance(c.report_to, str) else c.report_to
    _check(all(r in REPORTERS for r in reporters) and (len(reporters) == 1 or not set(reporters) & set(REPORTER_ALONE)),
           "report_to", c.report_to, "one of " + ", ".join(map(repr, REPORTER_ALONE)) + ", or a list of "
           + ", ".join(map(repr, REPORTER_BACKENDS)))


def _one_compute_precision(c: TrainConfig) -> None:
    _check(not (c.bf16 and c.fp16), "fp16", c.fp16, "False when bf16=True (choose one compute precision)")


def _beta_floor_below_beta(c: TrainConfig) -> None:
    _check(c.beta_min is None or c.beta_min <= c.beta, "beta_min", c.beta_min,
           f"None or between {MIN_BETA:g} and beta ({c.beta:g})")


def _padding_free_is_packed(c: TrainConfig) -> None:
    _check(not c.padding_free or c.layout != "shared_prompt", "padding_free", c.padding_free,
           "False with layout='shared_prompt' (padding_free=True means layout='packed')")


def _epochs_or_steps(c: TrainConfig) -> None:
    _check(c.num_train_epochs > 0 or c.max_steps > 0, "num_train_epochs", c.num_train_epochs,
           "a finite number > 0 (or set max_steps >= 1)")


def _warmup_given_once(c: TrainConfig) -> None:
    _check(not (c.warmup_steps and c.warmup_ratio), "warmup_ratio", c.warmup_ratio,
           f"0 when warmup_steps is set ({c.warmup_steps:g}): they are two spellings of one warm-up")


def _output_dir_named(c: TrainConfig) -> None:
    _check(bool(c.output_dir), "output_dir", c.output_dir, "a non-empty path")


def _resume_changes_allowed(c: TrainConfig) -> None:
    if c.resume_allow_changes:
        from epsdpo.run_identity import check_allow_list

        check_allow_list(c.resume_allow_changes)


def _precompute_allowed(c: TrainConfig) -> None:
    if c.precompute_ref_log_probs:
        c._check_precompute()


def _prompt_below_max_length(c: TrainConfig) -> None:
    if c.max_length is not None and c.max_prompt_length is not None:
        _check(c.max_prompt_length < c.max_length, "max_prompt_length", c.max_prompt_length,
               f"below max_length ({c.max_length})")


def _companions_set(c: TrainConfig) -> None:
    """A setting that only shapes another is refused without it: it would change nothing, silently. The
    case that matters: a TRL YAML's gradient_checkpointing_kwargs relying on TRL's gradient_checkpointing
    default (true), which is false here."""
    _check(c.gradient_checkpointing_kwargs is None or c.gradient_checkpointing, "gradient_checkpointing_kwargs",
           c.gradient_checkpointing_kwargs, "unset unless gradient_checkpointing is true (epsdpo's default is "
           "false, TRL's true)")
    _check(c.greater_is_better is None or c.metric_for_best_model is not None, "greater_is_better",
           c.greater_is_better, "unset unless metric_for_best_model names the metric it orders")


CHECKS = (
    TrainConfig._check_scheduler_kwargs, _dtype_spellings_agree, _lora_targets_named, TrainConfig._check_device,
    _chat_template_is_a_file, _reporters_known, _one_compute_precision, _beta_floor_below_beta,
    TrainConfig._check_method, _padding_free_is_packed, _epochs_or_steps, _warmup_given_once, _output_dir_named,
    _resume_changes_allowed, _precompute_allowed, _prompt_below_max_length, _companions_set,
)


def _int_ceiling(f: dataclasses.Field) -> int:
    """The largest value of an integer field: its rule's own top when it has one (seed: 2**32 - 1),
    else MAX_INT."""
    rule = rule_of(f)
    high = getattr(rule, "high", None)
    if isinstance(high, int):
        return high - 1 if rule.high_open else high
    return MAX_INT


def _device_count(kind: str) -> int:
    """How many devices of a kind torch sees here (mps: one or none)."""
    import torch

    if kind == "mps":
        return int(torch.backends.mps.is_available())
    backend = getattr(torch, kind, None)
    return backend.device_count() if backend is not None and backend.is_available() else 0


def _numeric(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads `1e-5` as a string and `3` as an int; numeric fields want numbers."""
    types = (hint, *typing.get_args(hint))
    if float in types and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    if int in types and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    return value


def _refuse_unknown(data: dict[Any, Any], known: list[str]) -> None:
    unknown = sorted((k for k in data if k not in known), key=str)
    if unknown:
        raise UnknownConfigKeysError(unknown[:10], known)  # a file of a million keys gets a message of ten


def _allowed_types(hint: Any) -> tuple[Any, ...]:
    """`int | None` → (int, NoneType); `Literal[...] | None` → (Literal[...], NoneType); `bool` → (bool,)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigFieldError(name, value, allowed)
