"""The keys of TRL's DPO configs that are not epsdpo settings: each refused or accepted without effect, with why.

A TRL user's YAML (TRL 1.16's `DPOConfig`, `ModelConfig`, `ScriptArguments`, `DatasetMixtureConfig`,
and the launcher keys `trl dpo` itself reads) carries keys for things epsdpo does differently or not
at all. Every such key is listed here once, with TRL's default and the one-line reason, so that the
CLI and the conversion of a `DPOConfig` (epsdpo.trl_compat) never meet a TRL key they cannot explain:

- `REFUSED`: the values listed (TRL's default among them, so a YAML that spells out defaults runs)
  are accepted because they ask for nothing epsdpo does not do; any other value is refused with the
  reason, never trained silently without it.
- `WITHOUT_EFFECT`: any value is accepted and changes nothing, for the reason given (said once in
  the run's log when a YAML sets one away from TRL's default).
- `OTHER_NAMES`: TRL's name for an epsdpo setting (`use_cpu`: device, `disable_tqdm`: progress).

Keys that are `TrainConfig` fields or `epsdpo train` run keys are not here: they mean what TRL means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from epsdpo.config_fields import ConfigFieldError

NO_DDP_KNOBS = "epsdpo wraps the policy in DDP itself (every parameter is used in every step, buffers are not trained)"
NO_WORKERS = ("batches are cut from the tokenized pairs already in memory (the Rust store), in the training process; "
              "loader workers would only copy them")
NO_UPLOAD = "push_to_hub is refused (epsdpo uploads nothing), so there is no hub repository to name"
QUANTIZED_ONLY = "used only with load_in_4bit, which is refused"
ONE_DATASET = "give one dataset as dataset_name (or train_data) and its eval data as eval_data or a test split"


@dataclass(frozen=True)
class Refused:
    """A TRL key accepted only at the values that ask for nothing epsdpo does not do."""

    trl_default: Any
    reason: str
    also_accepted: tuple[Any, ...] = ()

    def accepts(self, value: Any) -> bool:
        return any(_same(value, ok) for ok in (self.trl_default, *self.also_accepted))


@dataclass(frozen=True)
class WithoutEffect:
    """A TRL key accepted with any value, which changes nothing here."""

    trl_default: Any
    reason: str


REFUSED: dict[str, Refused] = {
    # DPOConfig: optimisation
    "optim_args": Refused(None, "optimizer arguments beyond adam_beta1, adam_beta2, adam_epsilon and weight_decay "
                                "are not supported"),
    "optim_target_modules": Refused(None, "only AdamW (optim) is supported, over every trained parameter"),
    "average_tokens_across_devices": Refused(True, "the loss is averaged over the preference pairs of all "
                                                   "ranks, as TRL's default (true) averages it"),
    "label_smoothing_factor": Refused(0.0, "a classification-loss setting; DPO's smoothing is cdpo_smoothing"),
    "bf16_full_eval": Refused(False, "evaluation runs in the training precision (bf16 computes in bf16 already)"),
    "fp16_full_eval": Refused(False, "evaluation runs in the training precision (fp16 computes in fp16 already)"),
    "activation_checkpointing": Refused(None, "set gradient_checkpointing: true (it also works under fsdp)",
                                        (False,)),
    "activation_checkpointing_kwargs": Refused(None, "set gradient_checkpointing_kwargs"),
    "activation_offloading": Refused(False, "offloading activations to the CPU is not supported; "
                                            "gradient_checkpointing saves activation memory"),
    "torch_compile": Refused(False, "torch.compile is not supported"),
    "torch_compile_backend": Refused(None, "torch.compile is not supported"),
    "torch_compile_mode": Refused(None, "torch.compile is not supported"),
    "use_liger_kernel": Refused(False, "epsdpo's fused log-prob kernel is built in (chunk_size sizes it); "
                                       "Liger's is not used"),
    "liger_kernel_config": Refused(None, "epsdpo's fused log-prob kernel is built in; Liger's is not used"),
    "use_cache": Refused(False, "training forwards keep no key/value cache"),
    "neftune_noise_alpha": Refused(None, "NEFTune embedding noise is not supported"),
    "torch_empty_cache_steps": Refused(None, "emptying the CUDA cache on a schedule is not supported"),
    "auto_find_batch_size": Refused(False, "set per_device_train_batch_size, or max_tokens_per_batch for a "
                                           "token budget"),
    # DPOConfig: the loss (TRL's variants epsdpo does not implement)
    "loss_weights": Refused(None, "one loss is trained (loss_type sigmoid); weights of several are not supported"),
    "ld_alpha": Refused(None, "LD-DPO's length weighting is not supported"),
    "f_divergence_type": Refused("reverse_kl", "only DPO's reverse KL divergence is supported"),
    "use_weighting": Refused(False, "WPO's pair weighting is not supported"),
    "router_aux_loss_coef": Refused(None, "a mixture-of-experts router loss is not supported"),
    # DPOConfig: logging and evaluation
    "project": Refused("huggingface", "name the project through the backend's own setting (WANDB_PROJECT, "
                                      "TRACKIO_PROJECT, MLFLOW_EXPERIMENT_NAME)"),
    "trackio_space_id": Refused(None, "trackio logs locally here; a Space is not supported"),
    "trackio_bucket_id": Refused(None, "trackio logs locally here; a bucket is not supported"),
    "trackio_static_space_id": Refused(None, "trackio logs locally here; a Space is not supported"),
    "eval_delay": Refused(0, "evaluation follows eval_strategy and eval_steps from the first step", (0.0,)),
    "eval_on_start": Refused(False, "evaluation before the first step is not supported; evaluate() can be called"),
    "eval_use_gather_object": Refused(False, "evaluation gathers its sums, not Python objects"),
    "include_for_metrics": Refused([], "evaluation reports the DPO metrics only; compute_metrics is not supported"),
    "batch_eval_metrics": Refused(False, "evaluation reports the DPO metrics only; compute_metrics is not supported"),
    # DPOConfig: checkpoints and the hub
    "save_on_each_node": Refused(False, "the main process writes checkpoints to one output_dir all nodes share"),
    "enable_jit_checkpoint": Refused(False, "checkpoints are written at save_steps and on SIGTERM (preemption) "
                                            "already; a JIT checkpoint is not supported"),
    "ignore_data_skip": Refused(False, "a resumed run continues the sampler at its position; it never re-reads "
                                       "the pairs it skips"),
    "restore_callback_states_from_checkpoint": Refused(False, "callback states are not saved in checkpoints"),
    # DPOConfig: runtime
    "full_determinism": Refused(False, "seed seeds torch and the sampler; deterministic kernels are not forced"),
    "data_seed": Refused(None, "the sampler uses seed; a separate data seed is not supported"),
    "accelerator_config": Refused(None, "accelerate's Accelerator is not used; see docs/launch.md"),
    "parallelism_config": Refused(None, "tensor / context / sequence parallelism is not supported; fsdp (FSDP2) "
                                        "and DDP are"),
    "dataloader_drop_last": Refused(False, "every pair trains: an epoch's last batch is a smaller one"),
    "train_sampling_strategy": Refused("random", "pairs are shuffled each epoch (group_by_length batches similar "
                                                 "lengths together); other orders are not supported",
                                       ("group_by_length",)),
    "ddp_backend": Refused(None, "the backend is nccl on CUDA and gloo on the CPU"),
    "fsdp_config": Refused(None, "set fsdp: true: epsdpo's FSDP2 shards fully, each transformer block one unit "
                                 "(docs/launch.md)"),
    "deepspeed": Refused(None, "DeepSpeed is not supported; set fsdp: true (FSDP2) to shard"),
    "debug": Refused("", "transformers' debug modes are not supported", ([],)),
    # ModelConfig
    "lora_target_parameters": Refused(None, "LoRA on parameters (not modules) is not supported; use "
                                            "lora_target_modules"),
    "lora_modules_to_save": Refused(None, "training whole modules beside the adapters is not supported"),
    "lora_task_type": Refused("CAUSAL_LM", "a causal language model is trained"),
    "use_rslora": Refused(False, "rank-stabilised LoRA is not supported"),
    "use_dora": Refused(False, "DoRA is not supported"),
    "load_in_8bit": Refused(False, "quantized loading is not supported: trained weights are float32 "
                                   "(docs/precision.md)"),
    "load_in_4bit": Refused(False, "quantized loading is not supported: trained weights are float32 "
                                   "(docs/precision.md)"),
    # ScriptArguments and DatasetMixtureConfig
    "dataset_streaming": Refused(False, "the pairs are tokenized into the store before training"),
    "streaming": Refused(False, "the pairs are tokenized into the store before training"),
    "datasets": Refused([], ONE_DATASET),
    "test_split_size": Refused(None, ONE_DATASET),
    # keys TRL's `trl dpo` command hands to accelerate launch: epsdpo train is one process of a launched run
    "num_processes": Refused(None, "launch the processes with torchrun --nproc_per_node N (or accelerate launch "
                                   "--num_processes N) -m epsdpo train ...; see docs/launch.md"),
    "accelerate_config": Refused(None, "launch with accelerate launch --config_file FILE -m epsdpo train ...; "
                                       "see docs/launch.md"),
}

WITHOUT_EFFECT: dict[str, WithoutEffect] = {
    "dataloader_num_workers": WithoutEffect(0, NO_WORKERS),
    "dataloader_pin_memory": WithoutEffect(True, NO_WORKERS),
    "dataloader_persistent_workers": WithoutEffect(False, NO_WORKERS),
    "dataloader_prefetch_factor": WithoutEffect(None, NO_WORKERS),
    "dataloader_multiprocessing_context": WithoutEffect(None, NO_WORKERS),
    "dataloader_in_order": WithoutEffect(True, NO_WORKERS),
    "label_names": WithoutEffect(None, "the loader reads the prompt, chosen and rejected columns"),
    "length_column_name": WithoutEffect("length", "lengths come from the tokenized pairs"),
    "hub_model_id": WithoutEffect(None, NO_UPLOAD),
    "hub_token": WithoutEffect(None, NO_UPLOAD),
    "hub_private_repo": WithoutEffect(None, NO_UPLOAD),
    "hub_strategy": WithoutEffect("every_save", NO_UPLOAD),
    "hub_always_push": WithoutEffect(False, NO_UPLOAD),
    "hub_revision": WithoutEffect(None, NO_UPLOAD),
    "log_level": WithoutEffect("passive", "epsdpo's log lines come from the main process at one level"),
    "log_level_replica": WithoutEffect("warning", "epsdpo's log lines come from the main process at one level"),
    "log_on_each_node": WithoutEffect(True, "epsdpo's log lines come from the main process"),
    "logging_nan_inf_filter": WithoutEffect(True, "a non-finite loss stops the run, so no logged loss is "
                                                  "ever nan or inf"),
    "include_num_input_tokens_seen": WithoutEffect("no", "num_tokens is logged with every training log"),
    "skip_memory_metrics": WithoutEffect(True, "memory metrics are not reported"),
    "prediction_loss_only": WithoutEffect(False, "evaluation reports the DPO loss and reward metrics, no "
                                                 "predictions"),
    "eval_do_concat_batches": WithoutEffect(True, "evaluation sums its metrics over batches; nothing is "
                                                  "concatenated"),
    "eval_accumulation_steps": WithoutEffect(None, "evaluation sums its metrics as it goes; nothing is "
                                                   "accumulated on the device"),
    "do_train": WithoutEffect(False, "epsdpo train always trains (transformers' Trainer does not read it either)"),
    "do_eval": WithoutEffect(False, "evaluation follows eval_strategy (transformers' Trainer does not read it "
                                    "either)"),
    "do_predict": WithoutEffect(False, "there is no prediction step (transformers' Trainer does not read it "
                                       "either)"),
    "local_rank": WithoutEffect(-1, "the rank comes from the launcher's environment (LOCAL_RANK)"),
    "ddp_find_unused_parameters": WithoutEffect(None, NO_DDP_KNOBS),
    "ddp_bucket_cap_mb": WithoutEffect(None, NO_DDP_KNOBS),
    "ddp_broadcast_buffers": WithoutEffect(None, NO_DDP_KNOBS),
    "ddp_static_graph": WithoutEffect(None, NO_DDP_KNOBS),
    "ignore_bias_buffers": WithoutEffect(False, NO_DDP_KNOBS),
    "pad_token": WithoutEffect(None, "padding is masked out of every loss and metric, so the pad token changes "
                                     "nothing (the tokenizer's pad token, else its eos, is used)"),
    "f_alpha_divergence_coef": WithoutEffect(0.5, "used only with f_divergence_type alpha_divergence, which is "
                                                  "refused"),
    "discopop_tau": WithoutEffect(0.05, "used only with TRL's discopop loss, which is refused"),
    "bnb_4bit_quant_type": WithoutEffect("nf4", QUANTIZED_ONLY),
    "use_bnb_nested_quant": WithoutEffect(False, QUANTIZED_ONLY),
    "bnb_4bit_quant_storage": WithoutEffect(None, QUANTIZED_ONLY),
}

# TRL keys that are an epsdpo setting under another name: TRL's default, and the setting they stand for
OTHER_NAMES: dict[str, tuple[Any, str]] = {"use_cpu": (False, "device"), "disable_tqdm": (None, "progress")}

KEYS: tuple[str, ...] = (*REFUSED, *WITHOUT_EFFECT, *OTHER_NAMES)


def _same(value: Any, expected: Any) -> bool:
    """Equal, without True == 1 or 0 == False passing for one another."""
    return value == expected and (isinstance(value, bool) == isinstance(expected, bool))


def refusal(name: str, value: Any) -> ConfigFieldError | None:
    """Why `name: value` is refused, an error naming the key; None when it is accepted (a
    `WITHOUT_EFFECT` key, a `REFUSED` key at an accepted value, or a key not in this table)."""
    entry = REFUSED.get(name)
    if entry is None or entry.accepts(value):
        return None
    return ConfigFieldError(name, value, repr(entry.trl_default), reason=entry.reason)


def without_effect(name: str, value: Any) -> str | None:
    """Why `name: value` changes nothing here, when it is set away from TRL's default; None otherwise."""
    entry = WITHOUT_EFFECT.get(name)
    if entry is None or _same(value, entry.trl_default):
        return None
    return f"{name} has no effect: {entry.reason}"


def trl_default(name: str) -> Any:
    """TRL 1.16's default for a key of this table."""
    if name in OTHER_NAMES:
        return OTHER_NAMES[name][0]
    return (REFUSED.get(name) or WITHOUT_EFFECT[name]).trl_default


def as_settings(name: str, value: Any) -> dict[str, Any]:
    """The epsdpo settings a key of OTHER_NAMES asks for: use_cpu true is device cpu, disable_tqdm
    true is progress false; their other values ask for nothing. ValueError for a value not a boolean."""
    if value is None and name == "disable_tqdm":
        return {}
    if not isinstance(value, bool):
        raise ConfigFieldError(name, value, "true or false (TRL's meaning)")
    if not value:
        return {}
    return {"device": "cpu"} if name == "use_cpu" else {"progress": False}


def check(values: dict[str, Any]) -> list[str]:
    """Refuses (ValueError, one line naming the key) the first of `values` (TRL keys of this table,
    as a YAML or a DPOConfig gives them) at a value epsdpo does not honour; returns the lines that
    say which of the accepted ones change nothing here."""
    for name, value in values.items():
        refused = refusal(name, value)
        if refused is not None:
            raise refused
    return [line for name, value in values.items() if (line := without_effect(name, value))]
