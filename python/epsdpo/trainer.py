"""`Trainer`: the ε-DPO training loop.

One optimizer step, top to bottom (`_train_step`):

1. the accumulation cycle's micro-batches arrive collated (`epsdpo.feed`, one cycle ahead in a
   background thread); their pairs are counted over all ranks;
2. per micro-batch (`_micro_batch`): reference forward (no grad) and policy forward; the fused
   kernel gives per-sequence policy / reference / relaxed / tightened log-probs, the step rule s_i;
   the method (`epsdpo.methods`) gives each pair's step, its β_i and its loss, which, divided by the
   cycle's global pair count, is backpropagated;
3. DDP averages (FSDP reduce-scatters) gradients during the last micro-batch's backward; clip,
   AdamW, scheduler; a non-finite weight stops the run here, before anything is saved, and so does
   fp16 loss scaling that keeps skipping steps (`Precision.stalled`);
4. the method's post-step work: the β update β ← β / (1 + ε·s̄) over every pair of the cycle on
   every rank, TR-DPO's reference update; then `StallWatch` warns when β has shrunk below a
   thousandth of its start and stops a run whose gradient has been exactly zero for ten steps.

Every micro-batch of a cycle uses the same base β, and the `kl/beta` logged for step k is that β.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from epsdpo._core import KlController
from epsdpo.attention import use_segment_attention
from epsdpo.beta_rules import PairBetas, PairLogps
from epsdpo.callbacks import (
    CallbackHandler,
    ScheduleCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    agree_across_ranks,
    best_metric_improved,
    check_metric_for_best_model,
    stateful_callbacks,
)
from epsdpo.checkpoint import PREFIX, TRAINER_STATE, list_checkpoints, write_file
from epsdpo.config import TrainConfig
from epsdpo.beta_ledger import merged_ledger
from epsdpo.distributed import (
    DistInfo,
    PeerTimeoutError,
    all_reduce_sum,
    any_rank,
    barrier,
    gather_bytes,
    gradient_sync,
    init_from_env,
    replicate,
    restart_count,
    timed_out,
)
from epsdpo.feed import CycleFeed, as_store, check_vocabulary, filler_batch, make_collator, make_sampler
from epsdpo.interrupt import StopOnSignal, TrainingInterrupted
from epsdpo.launcher import apply_launcher_settings
from epsdpo.methods import build_method
from epsdpo.model_card import RunFacts, describe_source, write_run_card
from epsdpo.models import (
    AdapterFreeReference,
    ChatTemplateError,
    default_reference,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    read_chat_template,
    with_lora,
)
from epsdpo.precision import (
    Precision,
    apply_tf32,
    check_trainable_precision,
    fsdp_mixed_precision,
    torch_dtype,
)
from epsdpo.rank_agreement import AUTO, agree_on_checkpoint, check_settings_agree, run_settings
from epsdpo.run_identity import identity, store_fingerprint, tokenizer_fingerprint
from epsdpo.reference_logps import lookup, precompute_reference_logps
from epsdpo.reporting import MetricsLog, RunTotals, eval_summary
from epsdpo.run_checkpoints import RunParts, claim_output_dir, require_shared_output_dir, resume_run, save_run
from epsdpo.run_lock import lock_output_dir
from epsdpo.scoring import batch_logps
from epsdpo.sharding import empty_onto_meta, full_model_state, grad_norm_value, shard
from epsdpo.staged import publish_files, replace_file, write_folder
from epsdpo.stall_watch import StallWatch, StalledTrainingError  # noqa: F401  (raised from here)
from epsdpo.step_metrics import StepSums
from epsdpo.trl_compat import trainer_inputs

if TYPE_CHECKING:
    from epsdpo._core import Batch

# What from_pretrained reads first in a model folder (a full model's config, a PEFT adapter's): written
# last into output_dir, so that a model there without them is not found rather than found half-written
MODEL_MARKERS = ("config.json", "adapter_config.json")


class NonFiniteError(FloatingPointError):
    """A loss, gradient or weight became NaN/inf; raised before anything of that step is saved."""


class PairLosses(NamedTuple):
    """One micro-batch scored: log-probs, β_i, per-pair losses (with gradient when training) and rewards."""

    logps: PairLogps
    betas: PairBetas
    losses: Tensor
    reward_chosen: Tensor
    reward_rejected: Tensor


def _check_evaluation_has_data(config: TrainConfig, eval_dataset: Any) -> None:
    """Evaluation asked for without eval data is an error, as in transformers' Trainer: a run that
    was told to evaluate must not train to the end without a word and without one evaluation."""
    if eval_dataset is not None:
        return
    if config.eval_strategy in ("steps", "epoch"):
        asked = f"eval_strategy={config.eval_strategy!r}"
    elif config.eval_strategy is None and config.eval_steps is not None:
        asked = f"eval_steps={config.eval_steps}"
    else:
        return
    raise ValueError(f"{asked} asks for evaluation, but no eval_dataset was given: pass eval_dataset (epsdpo "
                     "train: eval_data, or dataset_test_split for a split of the training dataset), or set "
                     "eval_strategy='no'")


class Trainer:
    """Trains a causal LM on preference pairs with ε-DPO (or DPO, TR-DPO, β-DPO, IPO: `config.method`).

    Example::

        import epsdpo

        config = epsdpo.TrainConfig(output_dir="runs/mine", beta=0.1, epsilon=0.01, layout="packed",
                                    learning_rate=5e-7, bf16=True, save_steps=100)
        trainer = epsdpo.Trainer("path/to/model", args=config, train_dataset="pairs.jsonl",
                                 eval_dataset="held_out.jsonl")
        state = trainer.train()                     # or train(resume_from_checkpoint=True)
        print(state.global_step, state.beta, trainer.evaluate()["eval_rewards/accuracies"])

    The call is TRL's `DPOTrainer`'s: ``Trainer(model=..., ref_model=None, args=DPOConfig(...),
    train_dataset=..., eval_dataset=None, processing_class=tokenizer, callbacks=[...],
    peft_config=LoraConfig(...))``, by keyword or in its positional order, `args` a `TrainConfig` or a
    TRL `DPOConfig` (epsdpo.trl_compat); TRL's arguments epsdpo does not take (data_collator,
    compute_metrics, optimizers, quantization_config) are refused when given. The earlier form
    ``Trainer(model, config, train_dataset, tokenizer=...)`` still works: a config in the second
    position cannot be a reference model; `config=` and `tokenizer=` are other names of `args=` and
    `processing_class=`.

    `model` and `ref_model` are modules or paths (a folder, a `.gguf` file, a hub id where a hub is
    reachable); without `ref_model` the reference is a frozen copy of the initial policy (a PEFT
    policy's own base model, adapters off). Datasets are a `PreferenceStore`, a saved `.store`, a
    `datasets.Dataset` or a local `.jsonl` / `.json` / `.parquet` file in TRL's preference formats;
    raw text needs a tokenizer (by default the model's own). Outputs go under `config.output_dir`:
    `metrics.jsonl`, checkpoints, `final/` (with its model card, README.md), `beta_ledger.npz` and
    plots; the final model's files are also in `output_dir` itself, as after TRL's script. `output_dir`,
    every `checkpoint-N/` and `final/` load with `AutoModelForCausalLM.from_pretrained` (a sharded FSDP
    checkpoint excepted: see epsdpo.checkpoint). `callbacks`: transformers' `TrainerCallback`s
    (`epsdpo.callbacks`), run at transformers' events, whose `TrainerControl` flags the loop honours.
    """

    def __init__(
        self,
        model: nn.Module | str | Path,
        *positional: Any,
        ref_model: nn.Module | str | Path | None = None,
        args: Any = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tokenizer: Any = None,
        config: TrainConfig | None = None,
    ) -> None:
        # TRL's DPOTrainer call (keywords, or its positional order), or epsdpo's earlier
        # Trainer(model, config, train_dataset, ...) when the second argument is a config (epsdpo.trl_compat)
        given = trainer_inputs(model, positional, dict(
            ref_model=ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, optimizers=optimizers, quantization_config=quantization_config,
            peft_config=peft_config, tokenizer=tokenizer, config=config))
        config, ref_model, train_dataset, eval_dataset, tokenizer = (
            given.config, given.ref_model, given.train_dataset, given.eval_dataset, given.tokenizer)
        # what the launcher (accelerate launch) asks for is part of the run's settings, recorded with them
        self.config = config = apply_launcher_settings(config, os.environ)
        _check_evaluation_has_data(config, eval_dataset)
        check_metric_for_best_model(config, eval_dataset is not None)
        config.check_device_present()
        self.dist: DistInfo = init_from_env(config.ddp_timeout)
        torch.manual_seed(config.seed)
        auto = f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(config.device or auto)
        apply_tf32(config.tf32, self.device)
        self.output_dir = Path(config.output_dir)
        # named on the model card: paths and hub ids as given, before loading turns them into objects
        self.sources = {"model": describe_source(model), "train": describe_source(train_dataset),
                        "eval": describe_source(eval_dataset)}
        self.tokenizer = self._setup_tokenizer(tokenizer, model)
        self._setup_models(model, ref_model)
        self._setup_data(train_dataset, eval_dataset)
        # Before the first collective whose schedule depends on the settings (DDP's or FSDP's wrapping)
        self._fingerprints: dict[str, Any] = {}
        if self.dist.enabled:
            settings = run_settings(config, self.train_store, self.eval_store, self.tokenizer)
            check_settings_agree(settings, self.dist)
            self._fingerprints = {key: settings[key] for key in ("train_data", "tokenizer")}
        self._setup_distribution()
        self.precision = Precision(config.compute_dtype, self.device, sharded=self.sharded)
        self._setup_reference_logps()
        self.kl = KlController(config.beta, config.step_epsilon, config.beta_min)
        self.method = build_method(config, self.kl, self.dist, self.device, self.model, self.ref_model)
        self._setup_optimization()
        self.metrics = MetricsLog(self.output_dir, config.report_to, self.dist.is_main,
                                  config.to_dict())
        # transformers' callback protocol; the run's own schedule is the first callback (epsdpo.callbacks)
        self.callback_handler = CallbackHandler([ScheduleCallback(self.eval_store is not None), *given.callbacks],
                                                self.model, self.tokenizer, self.optimizer, self.scheduler)
        self.control = TrainerControl()
        # each resume: its step, checkpoint and the changes resume_allow_changes let through (checkpoints
        # and the model card carry them); the run's identity, computed at the first save or resume
        self.resumes: list[dict[str, Any]] = []
        self._identity: dict[str, Any] | None = None
        self.control = self.callback_handler.on_init_end(config, self.state, self.control)

    # --------------------------------------------------------------------------------- setup
    def _setup_tokenizer(self, tokenizer: Any, model: Any) -> Any:
        tokenizer = self._find_tokenizer(tokenizer, model)
        path = self.config.chat_template_path
        if path is not None:  # as TRL's SFT and reward trainers apply a template file
            if tokenizer is None:
                raise ChatTemplateError(f"chat_template_path={path!r} is set but there is no tokenizer to give it to: "
                                        "pass tokenizer=")
            tokenizer.chat_template = read_chat_template(path)
        return tokenizer

    def _find_tokenizer(self, tokenizer: Any, model: Any) -> Any:
        if isinstance(tokenizer, (str, Path)):
            same = isinstance(model, (str, Path)) and str(tokenizer) == str(model)
            return load_tokenizer(tokenizer, self.config.tokenizer_load_kwargs(same_source=same))
        if tokenizer is None and isinstance(model, (str, Path)):
            # Only raw text data needs a tokenizer (a PreferenceStore is already tokenized), so a
            # model folder without tokenizer files is not an error here.
            try:
                return load_tokenizer(model, self.config.tokenizer_load_kwargs(same_source=True))
            except (OSError, ValueError):
                return None
        return tokenizer

    def _setup_models(self, model: nn.Module | str | Path, ref_model: nn.Module | str | Path | None) -> None:
        c = self.config
        if isinstance(ref_model, nn.Module) and ref_model is model:
            # The reference is frozen in place, which would freeze the policy too (one path for both is
            # fine: each is loaded on its own)
            raise ValueError("ref_model is the same object as model: pass a copy, or leave ref_model unset for a "
                             "frozen copy of the initial policy")
        dtype = torch_dtype(c.dtype)
        self.sharded = c.fsdp and self.dist.enabled
        # Sharded models stay on the host: FSDP gives each rank's device its own shards only (`shard`)
        placement = None if self.sharded else self.device
        self.model = load_causal_lm(model, dtype, c.model_load_kwargs()).to(placement)
        if c.use_peft:
            self.model = with_lora(self.model, c)
        check_trainable_precision(self.model, c.compute_dtype)
        if ref_model is not None:
            self.ref_model = (load_causal_lm(ref_model, dtype, c.model_load_kwargs()).to(placement)
                              .requires_grad_(False).eval())
        else:
            self.ref_model = default_reference(self.model)
        if c.disable_dropout:
            for module in (self.model, self.ref_model):
                if isinstance(module, nn.Module):
                    disable_dropout(module)
        # Padded and packed batches then attend within each sequence instead of through an L×L mask
        use_segment_attention(self.model)
        if isinstance(self.ref_model, nn.Module):
            use_segment_attention(self.ref_model)
        if c.gradient_checkpointing and hasattr(self.model, "gradient_checkpointing_enable"):
            # Non-reentrant checkpointing: the reentrant kind marks parameters ready twice under DDP
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=c.gradient_checkpointing_kwargs or {"use_reentrant": False})
            if isinstance(self.ref_model, AdapterFreeReference):
                # Frozen embeddings would otherwise cut the gradient path through checkpointed blocks
                self.model.enable_input_require_grads()
        # What each model loaded, by name, held on the host until `shard` copies each rank's part onto its
        # device; the models themselves hold nothing until then
        self._host_weights: dict[str, dict[str, Tensor]] = {}
        if self.sharded and not isinstance(self.ref_model, AdapterFreeReference):
            self._host_weights = {"policy": empty_onto_meta(self.model), "reference": empty_onto_meta(self.ref_model)}

    def _setup_distribution(self) -> None:
        """What the loop runs: the models themselves, their `Scorer` root units sharded by FSDP, or the
        policy's `Scorer` replicated by DDP (gradients averaged during the last backward of a cycle)."""
        self.policy_unit: nn.Module = self.model
        # None once precomputed reference log-probs replace it (precompute_ref_log_probs)
        self.reference_unit: nn.Module | AdapterFreeReference | None = self.ref_model
        if self.sharded:
            if isinstance(self.ref_model, AdapterFreeReference):
                raise ValueError("fsdp=True with a PEFT policy is not supported: pass ref_model= or run without fsdp")
            mixed_precision = fsdp_mixed_precision(self.config.compute_dtype)
            weights = self._host_weights
            self.policy_unit = shard(self.model, weights.pop("policy"), trainable=True, device=self.device,
                                     mixed_precision=mixed_precision)
            self.reference_unit = shard(self.ref_model, weights.pop("reference"), trainable=False,
                                        device=self.device, mixed_precision=mixed_precision)
        elif self.dist.enabled:
            self.policy_unit = replicate(self.model, self.device)

    def _setup_data(self, train_dataset: Any, eval_dataset: Any) -> None:
        c = self.config
        self.collator = make_collator(c, self.tokenizer)
        progress = c.progress and self.dist.is_main
        self.train_store, train_lengths = as_store(train_dataset, c, self.tokenizer, self.collator, progress=progress)
        self.eval_store = None
        if eval_dataset is not None:
            self.eval_store = as_store(eval_dataset, c, self.tokenizer, self.collator, progress=progress,
                                       split="eval")[0]
        for store in (self.train_store, self.eval_store):
            if store is not None:
                check_vocabulary(store, self.model)
        self.sampler = make_sampler(c, self.collator, train_lengths, self.dist)
        self.feed = CycleFeed(self.train_store, self.collator, self.sampler, c.gradient_accumulation_steps)

    def _setup_reference_logps(self) -> None:
        """With precompute_ref_log_probs: the reference log-probs of every train and eval pair, then the
        reference released (its memory is what the option is for; the config refuses it for the methods
        that run the reference again). Recomputed on resume: they depend only on the data and the
        reference."""
        c = self.config
        self.reference_logps: dict[str, Tensor] = {}
        if not c.precompute_ref_log_probs:
            return
        sizes = {"train": c.precompute_ref_batch_size or c.per_device_train_batch_size,
                 "eval": c.precompute_ref_batch_size or c.per_device_eval_batch_size}
        for name, store in (("train", self.train_store), ("eval", self.eval_store)):
            if store is not None:
                self.reference_logps[name] = precompute_reference_logps(
                    self.reference_unit, store, self.collator, sizes[name], self.precision, c.chunk_size,
                    progress=c.progress and self.dist.is_main)
        self.ref_model = self.reference_unit = None

    def _setup_optimization(self) -> None:
        c = self.config
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:  # else the first backward fails deep in autograd, naming nothing
            raise ValueError("model has no trainable parameter (requires_grad is False on all of them): pass a "
                             "trainable policy, e.g. model.requires_grad_(True)")
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in self.params if p.ndim >= 2], "weight_decay": c.weight_decay},
                {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon,
            fused=True if c.optim == "adamw_torch_fused" else None,  # transformers' adamw_torch_fused
        )
        steps_per_epoch = math.ceil(len(self.sampler) / c.gradient_accumulation_steps)
        total = c.max_steps if c.max_steps > 0 else math.ceil(steps_per_epoch * c.num_train_epochs)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(c.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=c.warmup_steps_for(total), num_training_steps=total,
                                       scheduler_specific_kwargs=c.lr_scheduler_kwargs)
        self.steps_per_epoch = steps_per_epoch
        # transformers' TrainerState, filled as transformers' Trainer fills it (its interval fields are
        # the steps this run's strategies act on, with transformers' defaults where they act on none)
        self.state = TrainerState(
            max_steps=total, num_train_epochs=math.ceil(total / steps_per_epoch), logging_steps=c.logging_steps,
            eval_steps=c.eval_every() or c.logging_steps, save_steps=c.save_every() or 500,
            train_batch_size=c.per_device_train_batch_size, is_world_process_zero=self.dist.is_main,
            is_local_process_zero=self.dist.local_rank == 0)
        self.state.beta = self.kl.beta
        self.stall_watch = StallWatch(c.beta)

    # ---------------------------------------------------------------------------- one step
    def _score(self, batch: Batch, split: str = "train") -> PairLogps:
        """Log-probs and steps of a batch of the `split` ("train" or "eval") store."""
        precomputed = self.reference_logps.get(split)
        reference = self.reference_unit if precomputed is None else None
        with self.precision.autocast():
            seq = batch_logps(self.policy_unit, reference, batch, self.config.check_epsilon, self.config.chunk_size)
        policy_chosen, policy_rejected = seq.policy.chunk(2)
        if precomputed is None:
            reference_chosen, reference_rejected = seq.reference.chunk(2)
        else:
            reference_chosen, reference_rejected = lookup(precomputed, batch)
        steps = self.method.pair_steps(seq)
        return PairLogps(policy_chosen, policy_rejected, reference_chosen, reference_rejected, steps)

    def _micro_batch(self, batch: Batch, sums: StepSums, *, train: bool) -> PairLosses:
        """Score one micro-batch, choose β per pair, and add its metrics to `sums` (shared by
        training and evaluation)."""
        logps = self._score(batch, "train" if train else "eval")
        betas = self.method.beta_rule.pair_betas(batch["pair_ids"], logps, train=train)
        losses, reward_chosen, reward_rejected = self.method.loss(logps, betas.betas, batch)
        sums.add(logps, betas.betas, losses, reward_chosen, reward_rejected, batch)
        return PairLosses(logps, betas, losses, reward_chosen, reward_rejected)

    def _train_micro_batch(self, batch: Batch, step: int, global_pairs: float, sums: StepSums) -> str | None:
        """Forward and backward of one micro-batch, its loss a share of the cycle's global mean; under
        torchrun, what went non-finite (for `_optimizer_step` to stop every rank with)."""
        if len(batch["pair_ids"]) == 0:  # every pair of it was skipped as invalid
            self.method.beta_rule.empty_micro_batch()
            if self.dist.enabled:  # the other ranks' forward and gradient exchange wait for this one
                filler = self._score(filler_batch(self.collator, self.train_store))
                self.precision.backward(filler.policy_chosen.sum().mul(0.0))
            return None
        scored = self._micro_batch(batch, sums, train=True)
        nonfinite = None
        if not torch.isfinite(scored.losses).all():
            nonfinite = f"non-finite loss for pair ids {batch['pair_ids'].tolist()}"
            if not self.dist.enabled:
                raise NonFiniteError(f"step {step}: {nonfinite}; nothing of this step was saved")
            # The other ranks wait in this backward's gradient exchange: stopping here would hang them;
            # `_optimizer_step` stops every rank together.
        keep = scored.betas.keep
        # DDP and FSDP average gradients over ranks, so each rank's share of the global mean is its
        # loss sum over the global pair count (of kept pairs), times the world size.
        normaliser = global_pairs * scored.betas.kept_fraction / self.dist.world_size
        self.precision.backward((scored.losses if keep is None else scored.losses[keep]).sum().div(normaliser))
        return nonfinite

    def _optimizer_step(self, step: int, batches: list[Batch], nonfinite: list[str]) -> tuple[float, float, bool]:
        """Clip, step, schedule; (gradient norm, learning rate used, whether the step was applied)."""
        self.precision.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        # Whether any rank saw a non-finite loss, agreed on by all (every rank then stops together)
        bad_loss = any_rank(bool(nonfinite), self.dist)
        if (not torch.isfinite(grad_norm) and self.precision.scaler is None) or bad_loss:
            # fp16 overflow alone is the scaler's to skip; a non-finite loss is not
            pairs = [i for b in batches for i in b["pair_ids"].tolist()]
            cause = "; ".join(nonfinite) or ("non-finite loss on another rank" if bad_loss
                                             else f"non-finite gradient norm for pair ids {pairs}")
            raise NonFiniteError(f"step {step}: {cause}; nothing of this step was saved")
        # The learning rate logged for step k is the one step k used, read before the scheduler moves on.
        # This is TRL's meaning: transformers' Trainer (which TRL 1.16's DPOTrainer runs, transformers 5)
        # reads get_last_lr() after optimizer.step() and before lr_scheduler.step() ("get learning rate
        # before update"), and counts ceil(warmup ratio · total) warm-up steps as _setup_optimization
        # does; so with warm-up the first step logs 0.0, under TRL too (tests/test_outputs.py runs both).
        lr = self.scheduler.get_last_lr()[0]
        applied = self.precision.step(self.optimizer)
        if not applied and (stalled := self.precision.stalled()):
            # Skipping forever would train nothing while checkpoints and final/ are written
            raise NonFiniteError(f"step {step}: {stalled}; nothing of this step was saved")
        if applied:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        finite = self._weights_finite()
        if any_rank(not finite, self.dist):
            raise NonFiniteError(
                f"step {step}: the optimizer step made weights non-finite (learning rate {lr:g}, gradient norm "
                f"{float(grad_norm):.4g}){'' if finite else ' on this rank'}; nothing of this step was saved"
            )
        return float(grad_norm), lr, applied

    def _weights_finite(self) -> bool:
        """One fused pass over this rank's trained weights (its shards under FSDP) and one host sync:
        the norm of the per-tensor norms is finite iff every element is."""
        local = [getattr(p, "to_local", lambda p=p: p)() for p in self.params]
        return not local or bool(torch.isfinite(torch.stack(torch._foreach_norm(local)).norm()))

    def _train_step(self, batches: list[Batch]) -> dict[str, float]:
        self.model.train()
        step, beta = self.state.global_step + 1, self.method.beta_rule.beta
        local_pairs = float(sum(len(b["pair_ids"]) for b in batches))
        global_pairs = all_reduce_sum(torch.tensor([local_pairs], dtype=torch.float64), self.dist).item()
        sums, nonfinite = StepSums(), []
        for index, batch in enumerate(batches):
            # Gradients are exchanged only in the cycle's last backward, overlapping its computation.
            with gradient_sync(self.policy_unit, index == len(batches) - 1):
                problem = self._train_micro_batch(batch, step, global_pairs, sums)
            if problem:
                nonfinite.append(problem)
        grad_norm, lr, applied = self._optimizer_step(step, batches, nonfinite)
        if applied:
            self.method.beta_rule.end_step()
            for hook in self.method.after_step:
                hook(step)
        else:  # an fp16 overflow skipped the update: nothing that follows from it happens either
            self.method.beta_rule.skip_step()
        self.stall_watch.after_step(step, grad_norm, global_pairs, self.kl.beta)
        metrics = sums.all_reduce(self.dist).metrics()
        metrics.update({"grad_norm": grad_norm, "learning_rate": lr, "kl/beta": beta,
                        "real_tokens": sums["real_tokens"], "pairs": global_pairs})
        if self.precision.scaler is not None:
            metrics.update({"loss_scale": self.precision.scaler.get_scale(), "skipped_step": float(not applied)})
        return metrics

    # ---------------------------------------------------------------------------- public API
    @property
    def callbacks(self) -> list[TrainerCallback]:
        """The callbacks given and added, in order (the run's own schedule, `ScheduleCallback`, is not one)."""
        return [cb for cb in self.callback_handler.callbacks if not isinstance(cb, ScheduleCallback)]

    def add_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> None:
        """Add a callback (an instance, or a class to instantiate), as transformers' Trainer does."""
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> TrainerCallback | None:
        """Remove a callback (an instance, or the first of a class) and return it; None if absent."""
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> None:
        """Remove a callback (an instance, or the first of a class)."""
        self.callback_handler.remove_callback(callback)

    def train(self, resume_from_checkpoint: str | Path | bool | None = None) -> TrainerState:
        """Train to `max_steps` (or `num_train_epochs`), logging, evaluating and saving on the way,
        evaluate once more at the end when there is eval data (unless the last step just was, or
        eval_strategy is no), log transformers' closing summary (train_runtime, train_loss, ...), then
        write `final/` with its model card (and its files into output_dir itself), `trainer_state.json`,
        `beta_ledger.npz` and plots. The callbacks are called at transformers' events throughout, and the
        loop honours their TrainerControl flags (`epsdpo.callbacks`). `resume_from_checkpoint`: a
        checkpoint folder, or True for the newest in `output_dir`; the run then continues exactly. "auto":
        the newest complete checkpoint when there is one, else a fresh start — what a torchelastic restart
        (TORCHELASTIC_RESTART_COUNT > 0) does by itself. Under torchrun rank 0 chooses the checkpoint and
        every rank must see it (`epsdpo.rank_agreement`).

        The run holds `output_dir` for itself until it returns (`epsdpo.run_lock`: a second run there
        raises `OutputDirBusyError`). On the main thread, a first SIGTERM/SIGINT stops it after the
        current optimizer step with a checkpoint of that step, raising `TrainingInterrupted`; a
        second one ends the process at once (`epsdpo.interrupt`). Under torchrun, a rank that waits
        `ddp_timeout` seconds for another in a collective raises `PeerTimeoutError` (gloo; on NCCL
        torch's watchdog ends the process)."""
        lock = lock_output_dir(self.output_dir, self.dist)
        try:
            if self.sharded:  # every rank writes checkpoint shards: before any step, not at the first save
                require_shared_output_dir(self.output_dir, self.dist)
            with StopOnSignal() as stop:
                return self._train(resume_from_checkpoint, stop)
        except RuntimeError as error:
            if self.dist.enabled and timed_out(error):
                raise PeerTimeoutError(
                    f"rank {self.dist.rank} waited ddp_timeout={self.config.ddp_timeout} s after step "
                    f"{self.state.global_step} for another rank, which did not answer (hung, stalled or dead); "
                    "raise ddp_timeout if a step, evaluation or save can legitimately take longer") from error
            raise
        finally:
            self.feed.close()  # its collating thread ends with the run, however the run ends
            lock.release()

    def _train(self, resume_from_checkpoint: str | Path | bool | None, stop: StopOnSignal) -> TrainerState:
        c = self.config
        self._resume_or_claim_output_dir(resume_from_checkpoint)
        # one list: a callback reads in state.log_history what has been logged, as it is logged
        self.state.log_history = self.metrics.history
        totals = RunTotals(self.state)
        self.control = self.callback_handler.on_train_begin(c, self.state, self.control)
        progress = self._progress_bar()
        last, evaluated, in_epoch = time.perf_counter(), None, False
        try:
            for batches, sampler_state, ends_epoch in self.feed.cycles(self.state.max_steps - self.state.global_step):
                if not in_epoch:
                    self.control = self.callback_handler.on_epoch_begin(c, self.state, self.control)
                    in_epoch = True
                self.control = self.callback_handler.on_step_begin(c, self.state, self.control)
                metrics = self._train_step(batches)
                self.state.global_step += 1
                self.state.beta = self.kl.beta
                step, now = self.state.global_step, time.perf_counter()
                self.state.epoch = step / self.steps_per_epoch
                self.state.num_input_tokens_seen += int(metrics["real_tokens"])
                metrics["tokens_per_second"] = metrics.pop("real_tokens") / (now - last)
                totals.add_step(metrics.pop("pairs"), metrics["loss"])
                # the schedule (ScheduleCallback) and the user's callbacks raise the flags acted on, after
                # the step and again after its epoch ends, as in transformers' loop
                self.control = self.callback_handler.on_step_end(c, self.state, self.control)
                did_evaluate, saved = self._act_on_control(metrics, sampler_state)
                if ends_epoch:
                    self.control = self.callback_handler.on_epoch_end(c, self.state, self.control)
                    in_epoch = False
                    evaluated_at_epoch_end, saved_at_epoch_end = self._act_on_control(metrics, sampler_state)
                    did_evaluate, saved = did_evaluate or evaluated_at_epoch_end, saved or saved_at_epoch_end
                if did_evaluate:
                    evaluated = step
                signum = stop.agreed(self.dist)
                if signum is not None:
                    if not saved:
                        self._save(sampler_state)
                    raise TrainingInterrupted(signum, step, self.output_dir / f"{PREFIX}{step}")
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", beta=f"{self.kl.beta:.5f}")
                agree_across_ranks(self.control, self.dist)  # an on_evaluate or on_save may have stopped the run
                if self.control.should_training_stop:
                    break
                last = time.perf_counter()
        finally:
            if progress is not None:
                progress.close()
        self._finish_run(stop, evaluated, totals)
        return self.state

    def _resume_or_claim_output_dir(self, resume_from_checkpoint: str | Path | bool | None) -> None:
        """Resume the checkpoint every rank agrees on, or claim output_dir for a fresh run."""
        restarts = restart_count()
        if restarts and not resume_from_checkpoint:
            # torchrun --max-restarts re-runs the same command: it continues the run it restarts
            resume_from_checkpoint = AUTO
        checkpoint = (agree_on_checkpoint(self.output_dir, resume_from_checkpoint, self.dist)
                      if resume_from_checkpoint else None)
        if checkpoint is not None:
            if restarts and self.dist.is_main:
                print(f"epsdpo: torchelastic restart {restarts}: resuming {checkpoint}", flush=True)
            self.resumes = resume_run(self._checkpoint_parts(), checkpoint)
        else:
            claim_output_dir(self.output_dir, self.config.overwrite_output_dir, self.dist, restarted=restarts > 0)
            if restarts and self.dist.is_main:
                print(f"epsdpo: torchelastic restart {restarts}: no complete checkpoint in {self.output_dir} yet, "
                      "starting afresh", flush=True)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)

    def _finish_run(self, stop: StopOnSignal, evaluated: int | None, totals: RunTotals) -> None:
        """After the last step: the closing evaluation (unless that step just evaluated), the summary
        record, the final outputs (rank 0, after every rank's collectives), then on_train_end."""
        if self.eval_store is not None and self.config.eval_strategy != "no" and evaluated != self.state.global_step:
            self._evaluate_and_log(self.state.global_step)
        if stop.signum is not None:
            warnings.warn("a stop signal came after the last optimizer step: the run's outputs are written as usual",
                          stacklevel=4)
        self._log(totals.summary())  # train_runtime, train_loss, ... as transformers logs them
        state = full_model_state(self.model) if self.sharded else None  # every rank: a collective
        kl_states = gather_bytes(self.kl.state_dict()["state"], self.dist)  # every rank's ledger, for rank 0
        if self.dist.is_main:
            self._write_outputs(state, kl_states)
        barrier(self.dist)  # no rank leaves (and tears down its process group) while rank 0 writes
        self.control = self.callback_handler.on_train_end(self.config, self.state, self.control)

    def _act_on_control(self, metrics: dict[str, float], sampler_state: bytes) -> tuple[bool, bool]:
        """Log, evaluate and save as the control flags say (raised on one rank: on all), in transformers'
        order; whether it evaluated and whether it saved. Each event lowers its flag."""
        agree_across_ranks(self.control, self.dist)
        evaluate, save = self.control.should_evaluate, self.control.should_save
        if self.control.should_log:
            self._log(metrics)
        if evaluate:
            self._evaluate_and_log(self.state.global_step)
        if save:
            self._save(sampler_state)
        return evaluate, save

    def _log(self, logs: dict[str, float]) -> None:
        """One record, as transformers' Trainer.log makes it: the values with the epoch and the training
        tokens seen so far (`num_tokens`, TRL's name), then the step; then the callbacks' on_log."""
        logs = {**logs, "epoch": self.state.epoch, "num_tokens": float(self.state.num_input_tokens_seen)}
        self.metrics.log({"step": self.state.global_step, **logs})
        self.control = self.callback_handler.on_log(self.config, self.state, self.control, logs)

    def _save(self, sampler_state: bytes) -> None:
        """A checkpoint of this step, then the callbacks' on_save."""
        self.state.stateful_callbacks = stateful_callbacks(self.callback_handler, self.control)
        save_run(self._checkpoint_parts(), sampler_state)
        self.control = self.callback_handler.on_save(self.config, self.state, self.control)

    def _checkpoint_parts(self) -> RunParts:
        """The parts of this run a checkpoint saves and a resume restores (epsdpo.run_checkpoints)."""
        return RunParts(
            config=self.config, dist=self.dist, output_dir=self.output_dir, sharded=self.sharded, model=self.model,
            optimizer=self.optimizer, scheduler=self.scheduler, tokenizer=self.tokenizer, ref_model=self.ref_model,
            moves_reference=self.method.moves_reference, kl=self.kl, beta_rule=self.method.beta_rule,
            sampler=self.sampler, precision=self.precision, state=self.state, metrics=self.metrics,
            steps_per_epoch=self.steps_per_epoch, resumes=self.resumes, identity=self._run_identity,
        )

    def _run_identity(self) -> dict[str, Any]:
        """This run's identity (epsdpo.run_identity), computed once: hashing the training data takes a
        pass over it. The fingerprints the ranks compared at start-up are reused when they did."""
        if self._identity is None:
            known = self._fingerprints
            self._identity = identity(
                self.config, total_steps=self.state.max_steps, world_size=self.dist.world_size,
                train_data=known["train_data"] if "train_data" in known else store_fingerprint(self.train_store),
                tokenizer=known["tokenizer"] if "tokenizer" in known else tokenizer_fingerprint(self.tokenizer))
        return self._identity

    def _evaluate_and_log(self, step: int) -> None:
        """Evaluate (every rank), log the metrics, tell the callbacks (on_evaluate), keep the best metric,
        and print the main metrics as one console line (rank 0): metrics.jsonl alone leaves an interactive
        run blind to its held-out numbers."""
        if self.eval_store is None:
            raise ValueError(f"step {step}: a callback asked for an evaluation (control.should_evaluate), but no "
                             "eval_dataset was given")
        metrics = self.evaluate()
        self._log(metrics)
        self.control = self.callback_handler.on_evaluate(self.config, self.state, self.control, metrics=metrics)
        best_metric_improved(self.config, self.state, metrics)
        if self.dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(eval_summary(step, metrics))  # above a progress bar, not through it

    def _progress_bar(self) -> Any:
        if not (self.config.progress and self.dist.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.state.max_steps, initial=self.state.global_step,
                    desc=self.method.title, unit="step")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and TRL's reward metrics on the eval dataset (prefixed `eval_`), with per-pair β_i from
        the current β. Never updates β or any running statistic.

        Example: ``trainer.evaluate()["eval_rewards/accuracies"]``."""
        if self.eval_store is None:
            raise ValueError("no eval_dataset was given")
        self.model.eval()
        size = self.config.per_device_eval_batch_size
        indices = np.arange(self.dist.rank, len(self.eval_store), self.dist.world_size, dtype=np.uint32)
        # Rank 0 holds the most pairs; under FSDP every rank must run as many forwards as it does.
        batches = math.ceil(math.ceil(len(self.eval_store) / self.dist.world_size) / size)
        sums = StepSums()
        for start in range(0, batches * size, size):
            batch = self.collator(self.eval_store, indices[start : start + size])
            if len(batch["pair_ids"]) == 0:
                if self.sharded:
                    self._score(filler_batch(self.collator, self.eval_store), "eval")
                continue
            self._micro_batch(batch, sums, train=False)
        return sums.all_reduce(self.dist).metrics(prefix="eval_")

    def save_model(self, output_dir: str | Path | None = None) -> None:
        """The policy (and tokenizer) in Hugging Face format, loadable by `from_pretrained`, in
        `output_dir` (by default the config's output_dir, as transformers' save_model()). Every rank
        calls it (a sharded model is gathered first); rank 0 writes."""
        path = self.output_dir if output_dir is None else Path(output_dir)
        state = full_model_state(self.model) if self.sharded else None
        if not self.dist.is_main:
            return
        # Written in place, not staged like final/: `path` may be a folder holding other files (the
        # output_dir itself, the default), which a staged replace would delete.
        write_file(path, lambda folder: self._write_model(folder, state))

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Refused: epsdpo uploads nothing (TRL's trainer.push_to_hub())."""
        raise NotImplementedError("push_to_hub() is not supported: epsdpo has no hub upload; push output_dir/final "
                                  "with huggingface_hub's upload_folder")

    @property
    def args(self) -> TrainConfig:
        """The run's settings under TRL's name (`trainer.args`); a DPOConfig given arrives as the
        TrainConfig it maps to (epsdpo.trl_compat)."""
        return self.config

    @property
    def processing_class(self) -> Any:
        """The tokenizer, under TRL's name."""
        return self.tokenizer

    def _write_model(self, path: Path, state: dict[str, Tensor] | None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(path, state_dict=state)
        else:
            from safetensors.torch import save_file, save_model

            if state is None:
                save_model(self.model, str(path / "model.safetensors"))
            else:
                save_file(state, str(path / "model.safetensors"))
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(path)

    def checkpoints(self) -> list[Path]:
        """This output_dir's complete checkpoints, oldest first."""
        return list_checkpoints(self.output_dir)

    # ------------------------------------------------------------------------------ outputs
    def _card_facts(self) -> RunFacts:
        """What the model card says of this run besides its config (epsdpo.model_card)."""
        return RunFacts(
            steps=self.state.global_step, beta_initial=float(self.kl.beta_history()[0]), beta_final=self.kl.beta,
            train_pairs=len(self.train_store), world_size=self.dist.world_size, history=self.metrics.history,
            base_model=self.sources["model"], train_data=self.sources["train"],
            eval_pairs=None if self.eval_store is None else len(self.eval_store), eval_data=self.sources["eval"],
            resumes=self.resumes,
        )

    def _write_outputs(self, state: dict[str, Tensor] | None, kl_states: list[bytes]) -> None:
        """Rank 0, at the end of the run: the β ledger of every rank's pairs (`kl_states`: each
        rank's controller state; epsdpo.beta_ledger), the plots, then `final/` (the policy gathered
        in `state` under FSDP) with its model card, and final/'s files in output_dir itself. The ledger and
        `final/` appear whole or not at all (`epsdpo.staged`): final/ is complete, card included, before it
        is renamed into place; the copy in output_dir has its config.json removed first and put back
        last, so `from_pretrained(output_dir)` never loads a half-written model."""
        ledger = merged_ledger(kl_states)
        write_file(self.output_dir / "beta_ledger.npz", lambda path: replace_file(
            path, lambda handle: np.savez(handle, beta_history=self.kl.beta_history(), **ledger)))
        if self.config.plots:
            from epsdpo.plots import plot_run

            plot_run(self.metrics.history, self.output_dir / "plots")

        def write_final(staging: Path) -> None:
            self._write_model(staging, state)
            plot = self.output_dir / "plots" / "beta.png" if self.config.plots else None
            write_run_card(staging, self.config, self._card_facts(), plot)

        write_file(self.output_dir / "final", lambda folder: write_folder(folder, write_final))
        # transformers' TrainerState of the finished run, where transformers' save_state() puts it
        write_file(self.output_dir / TRAINER_STATE, lambda path: replace_file(
            path, lambda handle: handle.write(json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True)
                                              .encode() + b"\n")))
        # ... and its files at the root too, where TRL's script leaves the model: from_pretrained(output_dir)
        write_file(self.output_dir, lambda root: publish_files(root / "final", root, MODEL_MARKERS))
        self.metrics.close()
