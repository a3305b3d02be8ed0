"""`Trainer`: the ε-DPO training loop.

One optimizer step, top to bottom:

1. take the accumulation cycle's micro-batches from the Rust sampler (collated in a background
   thread while the previous step trains) and count the cycle's pairs over all ranks;
2. per micro-batch: reference forward (no grad) and policy forward, the fused chunked kernel gives
   per-sequence policy / reference / relaxed / tightened log-probs; the step rule gives s_i; the
   KlController turns them into β_i and books them; the ε-DPO loss, divided by the cycle's global
   pair count, is backpropagated;
3. gradients are averaged over ranks by DDP (or reduce-scattered by FSDP) during the last
   micro-batch's backward; then clip, AdamW and scheduler step;
4. all-reduce the step sums and apply β ← β / (1 + ε·s̄) once.

Every micro-batch of a cycle uses the same base β, and the `kl/beta` logged for step k is that β.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from epsdpo._core import BatchSampler, Collator, KlController, PreferenceStore, TruncationError
from epsdpo.attention import use_segment_attention
from epsdpo.baselines import BetaDPO, soft_update_reference
from epsdpo.checkpoint import (
    TRAINER_STATE,
    CheckpointError,
    begin_checkpoint,
    list_checkpoints,
    load_checkpoint,
    previous_run_outputs,
    resolve_checkpoint,
    save_checkpoint,
    save_sharded,
    staging_dir,
    verify_checkpoint,
)
from epsdpo.config import TrainConfig
from epsdpo.distributed import DistInfo, all_reduce_sum, barrier, gradient_sync, init_from_env, replicate
from epsdpo.loss import epsilon_dpo_loss, kl_steps, pair_log_ratio
from epsdpo.modeling import batch_logps
from epsdpo.models import AdapterFreeReference, default_reference, load_causal_lm, load_tokenizer
from epsdpo.precision import Precision, check_trainable_precision, fsdp_mixed_precision, torch_dtype
from epsdpo.reporting import MetricsLog
from epsdpo.sharding import full_model_state, grad_norm_value, shard

# Per-step sums all-reduced in one message; the metrics are ratios of these.
_SUMS = ("pairs", "beta", "loss", "reward_chosen", "reward_rejected", "correct", "logp_chosen", "logp_rejected",
         "relaxed", "tightened", "step_sum", "real_tokens", "all_tokens")


def _check_vocabulary(store: PreferenceStore, model: nn.Module) -> None:
    """Every token id must index the model's embedding; a store tokenized for another vocabulary would
    otherwise fail deep inside the forward pass with a bare IndexError. The store's own bound settles
    it at once when it is small enough; otherwise its tokens are scanned."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None or (store.vocab_size is not None and store.vocab_size <= rows):
        return
    for index in range(len(store)):
        largest = max(int(part.max()) for part in store[index] if len(part))
        if largest >= rows:
            raise ValueError(
                f"pair {index}: token id {largest} is beyond the model's embedding ({rows} rows; the data's "
                f"vocab_size is {store.vocab_size}): was it tokenized with another tokenizer?"
            )


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/inf; raised before anything of that step is saved."""


@dataclass
class TrainerState:
    global_step: int = 0
    max_steps: int = 0
    beta: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        model: nn.Module | str | Path,
        config: TrainConfig,
        train_dataset: Any,
        tokenizer: Any = None,
        ref_model: nn.Module | str | Path | None = None,
        eval_dataset: Any = None,
    ) -> None:
        self.config = config
        self.dist: DistInfo = init_from_env()
        torch.manual_seed(config.seed)
        auto = f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(config.device or auto)
        dtype = torch_dtype(config.dtype)
        self.tokenizer = tokenizer if tokenizer is None or not isinstance(tokenizer, (str, Path)) else load_tokenizer(tokenizer)
        if self.tokenizer is None and isinstance(model, (str, Path)):
            # Only raw text data needs a tokenizer (a PreferenceStore is already tokenized), so a
            # model folder without tokenizer files is not an error here.
            try:
                self.tokenizer = load_tokenizer(model)
            except (OSError, ValueError):
                self.tokenizer = None
        self.model = load_causal_lm(model, dtype).to(self.device)
        check_trainable_precision(self.model, config.compute_dtype)
        if ref_model is not None:
            self.ref_model = load_causal_lm(ref_model, dtype).to(self.device).requires_grad_(False).eval()
        else:
            self.ref_model = default_reference(self.model)
        if isinstance(self.ref_model, AdapterFreeReference) and config.method == "tr_dpo":
            raise ValueError("method='tr_dpo' moves the reference towards the policy, which needs a reference of "
                             "its own: pass ref_model= with a PEFT policy")
        # Padded and packed batches then attend within each sequence instead of through an L×L mask
        use_segment_attention(self.model)
        if isinstance(self.ref_model, nn.Module):
            use_segment_attention(self.ref_model)
        if config.gradient_checkpointing and hasattr(self.model, "gradient_checkpointing_enable"):
            # Non-reentrant checkpointing: the reentrant kind marks parameters ready twice under DDP
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if isinstance(self.ref_model, AdapterFreeReference):
                # Frozen embeddings would otherwise cut the gradient path through checkpointed blocks
                self.model.enable_input_require_grads()
        # What the loop runs: the models themselves, their `Scorer` root units sharded by FSDP, or the
        # policy's `Scorer` replicated by DDP (gradients averaged during the last backward of a cycle).
        self.sharded = config.fsdp and self.dist.enabled
        self.policy_unit: nn.Module = self.model
        self.reference_unit: nn.Module | AdapterFreeReference = self.ref_model
        if self.sharded:
            if isinstance(self.ref_model, AdapterFreeReference):
                raise ValueError("fsdp=True with a PEFT policy is not supported: pass ref_model= or run without fsdp")
            mixed_precision = fsdp_mixed_precision(config.compute_dtype)
            self.policy_unit = shard(self.model, trainable=True, mixed_precision=mixed_precision)
            self.reference_unit = shard(self.ref_model, trainable=False, mixed_precision=mixed_precision)
        elif self.dist.enabled:
            self.policy_unit = replicate(self.model, self.device)
        self.precision = Precision(config.compute_dtype, self.device, sharded=self.sharded)

        self.output_dir = Path(config.output_dir)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.collator = Collator(
            config.layout, max_length=config.max_length, max_prompt_length=config.max_prompt_length,
            truncation_mode=config.truncation_mode, pad_token_id=pad if pad is not None else 0,
            pad_to_multiple_of=config.pad_to_multiple_of, skip_empty=config.skip_invalid,
        )
        self.train_store, train_lengths = self._as_store(train_dataset)
        self.eval_store = None if eval_dataset is None else self._as_store(eval_dataset)[0]
        for store in (self.train_store, self.eval_store):
            if store is not None:
                _check_vocabulary(store, self.model)
        self.sampler = self._make_sampler(train_lengths)

        self.kl = KlController(config.beta, config.step_epsilon)
        self.beta_dpo = (BetaDPO(config.beta, config.beta_dpo_alpha, config.beta_dpo_momentum, config.beta_dpo_filter)
                         if config.method == "beta_dpo" else None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in self.params if p.ndim >= 2], "weight_decay": config.weight_decay},
                {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        )
        steps_per_epoch = math.ceil(len(self.sampler) / config.gradient_accumulation_steps)
        total = config.max_steps if config.max_steps > 0 else math.ceil(steps_per_epoch * config.num_train_epochs)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            config.lr_scheduler_type, self.optimizer,
            num_warmup_steps=math.ceil(config.warmup_ratio * total), num_training_steps=total,
        )
        self.state = TrainerState(max_steps=total, beta=self.kl.beta)
        self.metrics = MetricsLog(self.output_dir, config.report_to, self.dist.is_main and config.report_to != "none", config.to_dict())
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epsdpo-collate")

    # ----------------------------------------------------------------------------------- data
    def _as_store(self, dataset: Any) -> tuple[PreferenceStore, dict[str, Any]]:
        """The dataset as a store, and its truncated lengths (checked: no emptied completion
        unless `skip_invalid`)."""
        if isinstance(dataset, (str, Path)) and str(dataset).endswith(".store"):
            dataset = PreferenceStore.load(dataset)  # a store saved by `epsdpo prepare --output`
        if isinstance(dataset, PreferenceStore):
            store = dataset
        else:
            if self.tokenizer is None:
                raise ValueError("raw preference data needs a tokenizer: pass `tokenizer=` or a PreferenceStore")
            from epsdpo.data import load_preferences

            store, _ = load_preferences(
                dataset, self.tokenizer, max_length=self.config.max_length,
                max_prompt_length=self.config.max_prompt_length, cache_dir=self.config.dataset_cache_dir,
                skip_invalid=self.config.skip_invalid, progress=self.config.progress and self.dist.is_main,
            )
        if len(store) == 0:
            raise ValueError("the preference dataset is empty")
        lengths = self.collator.truncated_lengths(store)
        empty = lengths["empty"]
        if len(empty) == len(store):
            raise ValueError(
                f"no pair can be trained on: every completion of all {len(store)} pairs is empty after truncation to "
                f"max_length={self.config.max_length}, max_prompt_length={self.config.max_prompt_length}"
            )
        if len(empty) and not self.config.skip_invalid:
            error = TruncationError(
                f"pair {int(empty[0])}: a completion is empty after truncation to max_length={self.config.max_length}, "
                f"max_prompt_length={self.config.max_prompt_length} ({len(empty)} pairs like it); "
                "raise the limits or set skip_invalid=True to skip and count them"
            )
            error.pair_index = int(empty[0])
            raise error
        return store, lengths

    def _make_sampler(self, lengths: dict[str, Any]) -> BatchSampler:
        c = self.config
        chosen = lengths["prompt"] + lengths["chosen"]
        rejected = lengths["prompt"] + lengths["rejected"]
        if c.max_tokens_per_batch:
            mode = dict(mode="token_budget", max_tokens=c.max_tokens_per_batch, padded=c.layout != "packed")
        else:
            mode = dict(mode="length_grouped" if c.group_by_length else "shuffle")
        return BatchSampler(chosen, rejected, c.per_device_train_batch_size, seed=c.seed,
                            world_size=self.dist.world_size, rank=self.dist.rank, **mode)

    def _take_cycle(self) -> list[np.ndarray]:
        """The next accumulation cycle's pair indices; a cycle never spans two epochs."""
        cycle: list[np.ndarray] = []
        while len(cycle) < self.config.gradient_accumulation_steps:
            batch = next(self.sampler, None)
            if batch is None:
                self.sampler.set_epoch(self.sampler.epoch + 1)
                if cycle:
                    break
                continue
            cycle.append(batch)
        return cycle

    def _collate_cycle(self, cycle: list[np.ndarray]) -> list[dict[str, Any]]:
        return [self.collator(self.train_store, indices) for indices in cycle]

    # ----------------------------------------------------------------------------------- math
    def _score(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per-pair policy/reference log-probs (chosen, rejected) and steps s_i for one batch."""
        with self.precision.autocast():
            seq = batch_logps(self.policy_unit, self.reference_unit, batch, self.config.check_epsilon,
                              self.config.chunk_size)
        policy_c, policy_r = seq.policy.chunk(2)
        ref_c, ref_r = seq.reference.chunk(2)
        if self.config.check_epsilon > 0:
            steps = kl_steps(pair_log_ratio(seq.policy.detach()), pair_log_ratio(seq.relaxed), pair_log_ratio(seq.tightened))
        else:
            steps = torch.zeros_like(policy_c, dtype=torch.long)
        return policy_c, policy_r, ref_c, ref_r, steps

    def _weights_finite(self) -> bool:
        """One fused pass over this rank's trained weights (its shards under FSDP) and one host sync:
        the norm of the per-tensor norms is finite iff every element is."""
        local = [getattr(p, "to_local", lambda p=p: p)() for p in self.params]
        if not local:
            return True
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(local)).norm()))

    def _filler_batch(self, store: PreferenceStore) -> dict[str, Any]:
        """A batch that only keeps a rank in step with the others' sharded collectives; its results
        are discarded."""
        for index in range(len(store)):
            batch = self.collator(store, np.array([index], dtype=np.uint32))
            if len(batch["pair_ids"]):
                return batch
        raise ValueError("no pair of the dataset survives truncation")

    def _pair_betas(self, batch: dict[str, Any], pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, steps: Tensor,
                    *, train: bool) -> tuple[Tensor, Tensor | None]:
        """Per-pair β_i, and β-DPO's keep mask (None when every pair counts).

        Training books the steps in the KlController (cycle sums and ledger); evaluation only reads
        β. β-DPO replaces β_i by its batch β, from the batch's mean gap over all ranks."""
        codes = steps.to(torch.int8).cpu().numpy()
        if self.beta_dpo is None:
            record = self.kl.record if train else lambda _, s: self.kl.betas_for(s)
            return torch.from_numpy(record(batch["pair_ids"], codes)).to(self.device), None
        gaps = (self.config.beta * ((pc - rc) - (pr - rr))).detach().to(torch.float64)
        if not train:  # evaluation must not move β-DPO's running gap, so it scores at β₀
            return torch.full_like(gaps, self.beta_dpo.beta0), None
        self.kl.record(batch["pair_ids"], codes)
        total = all_reduce_sum(torch.tensor([gaps.sum().item(), float(gaps.numel())], dtype=torch.float64), self.dist)
        beta = self.beta_dpo.batch_beta(float(total[0] / total[1]))
        keep = self.beta_dpo.keep(gaps) if self.config.beta_dpo_filter is not None else None
        return torch.full_like(gaps, beta), keep

    def _accumulate(self, sums: Tensor, betas: Tensor, losses: Tensor, rc: Tensor, rr: Tensor, pc: Tensor, pr: Tensor,
                    steps: Tensor, batch: dict[str, Any]) -> None:
        mask = batch["attention_mask"]
        values = [len(losses), betas.sum(), losses.sum(), rc.sum(), rr.sum(), (rc > rr).sum(), pc.sum(), pr.sum(),
                  (steps > 0).sum(), (steps < 0).sum(), steps.sum(), int(mask.sum()), mask.size]
        sums += torch.tensor([float(v) for v in values], dtype=torch.float64)

    @staticmethod
    def _metrics(sums: Tensor, prefix: str = "") -> dict[str, float]:
        s = dict(zip(_SUMS, sums.tolist()))
        n = max(s["pairs"], 1.0)
        return {
            f"{prefix}loss": s["loss"] / n,
            f"{prefix}rewards/chosen": s["reward_chosen"] / n,
            f"{prefix}rewards/rejected": s["reward_rejected"] / n,
            f"{prefix}rewards/accuracies": s["correct"] / n,
            f"{prefix}rewards/margins": (s["reward_chosen"] - s["reward_rejected"]) / n,
            f"{prefix}logps/chosen": s["logp_chosen"] / n,
            f"{prefix}logps/rejected": s["logp_rejected"] / n,
            f"{prefix}kl/relaxed_frac": s["relaxed"] / n,
            f"{prefix}kl/tightened_frac": s["tightened"] / n,
            f"{prefix}kl/mean_step": s["step_sum"] / n,
            f"{prefix}kl/pair_beta_mean": s["beta"] / n,
            f"{prefix}padding_fraction": 1.0 - s["real_tokens"] / max(s["all_tokens"], 1.0),
        }

    def _train_micro_batch(self, batch: dict[str, Any], step: int, global_pairs: float, sums: Tensor) -> None:
        """Forward and backward of one micro-batch, its loss a share of the cycle's global mean."""
        c = self.config
        if len(batch["pair_ids"]) == 0:  # every pair of it was skipped as invalid
            if self.dist.enabled:  # the other ranks' forward and gradient exchange wait for this one
                self.precision.backward(self._score(self._filler_batch(self.train_store))[0].sum().mul(0.0))
            return
        pc, pr, rc, rr, steps = self._score(batch)
        betas, keep = self._pair_betas(batch, pc, pr, rc, rr, steps, train=True)
        losses, reward_c, reward_r = epsilon_dpo_loss(pc, pr, rc, rr, betas, c.label_smoothing)
        if not torch.isfinite(losses).all():
            raise NonFiniteError(
                f"step {step}: non-finite loss for pair ids {batch['pair_ids'].tolist()}; nothing of this step was saved"
            )
        # β-DPO's filter trains on the kept fraction only; everything else keeps every pair.
        kept_fraction = c.beta_dpo_filter if keep is not None else 1.0
        # DDP and FSDP average gradients over ranks, so each rank's share of the global mean is its
        # loss sum over the global pair count, times the world size.
        normaliser = global_pairs * kept_fraction / self.dist.world_size
        self.precision.backward((losses[keep].sum() if keep is not None else losses.sum()).div(normaliser))
        self._accumulate(sums, betas.cpu(), losses.detach().cpu(), reward_c.cpu(), reward_r.cpu(),
                         pc.detach().cpu(), pr.detach().cpu(), steps.cpu(), batch)

    def _train_step(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        c = self.config
        self.model.train()
        step = self.state.global_step + 1
        beta = self.kl.beta
        local_pairs = sum(len(b["pair_ids"]) for b in batches)
        global_pairs = all_reduce_sum(torch.tensor([float(local_pairs)], dtype=torch.float64), self.dist).item()
        sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        for index, batch in enumerate(batches):
            # Gradients are exchanged only in the cycle's last backward, overlapping its computation.
            with gradient_sync(self.policy_unit, index == len(batches) - 1):
                self._train_micro_batch(batch, step, global_pairs, sums)
        self.precision.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm if c.max_grad_norm > 0 else math.inf)
        grad_norm = grad_norm_value(grad_norm)
        if not torch.isfinite(grad_norm) and self.precision.scaler is None:  # fp16 overflow is the scaler's to skip
            pairs = [i for b in batches for i in b["pair_ids"].tolist()]
            raise NonFiniteError(f"step {step}: non-finite gradient norm for pair ids {pairs}; nothing of this step was saved")
        lr = self.scheduler.get_last_lr()[0]
        applied = self.precision.step(self.optimizer)
        if applied:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if c.method == "tr_dpo" and step % c.tr_dpo_tau == 0:
            soft_update_reference(self.ref_model, self.model, c.tr_dpo_alpha)
        # The β update uses the step sums of every pair of the cycle on every rank; the same message
        # carries each rank's verdict on its weights, so every rank stops together.
        local_sum, local_count = self.kl.local_sums()
        totals = all_reduce_sum(torch.tensor([float(local_sum), float(local_count), float(not self._weights_finite())],
                                             dtype=torch.float64), self.dist)
        if totals[2].item():
            raise NonFiniteError(
                f"step {step}: the optimizer step made weights non-finite (learning rate {lr:g}, gradient norm "
                f"{float(grad_norm):.4g}){' on some rank' if self.dist.enabled else ''}; nothing of this step was saved"
            )
        self.kl.apply_update(int(totals[0].item()), int(totals[1].item()))
        sums = all_reduce_sum(sums, self.dist)
        metrics = self._metrics(sums)
        metrics.update({"grad_norm": float(grad_norm), "learning_rate": lr, "kl/beta": beta,
                        "real_tokens": sums[_SUMS.index("real_tokens")].item()})
        if self.precision.scaler is not None:
            metrics.update({"loss_scale": self.precision.scaler.get_scale(), "skipped_step": float(not applied)})
        return metrics

    # ------------------------------------------------------------------------------ public API
    def train(self, resume_from_checkpoint: str | Path | bool | None = None) -> TrainerState:
        c = self.config
        if resume_from_checkpoint:
            self._resume(resolve_checkpoint(self.output_dir, resume_from_checkpoint))
        else:
            self._claim_output_dir()
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        progress = None
        if c.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.state.max_steps, initial=self.state.global_step, desc="ε-DPO" if c.check_epsilon else "DPO", unit="step")
        pending: Future | None = None
        sampler_state = None
        if self.state.global_step < self.state.max_steps:
            cycle = self._take_cycle()
            sampler_state = self.sampler.state_dict()["state"]
            pending = self._pool.submit(self._collate_cycle, cycle)
        try:
            while pending is not None:
                started = time.perf_counter()
                batches = pending.result()
                state_after_this_cycle = sampler_state
                pending = None
                if self.state.global_step + 1 < self.state.max_steps:
                    # Prepare the next cycle while this one trains.
                    next_cycle = self._take_cycle()
                    sampler_state = self.sampler.state_dict()["state"]
                    pending = self._pool.submit(self._collate_cycle, next_cycle)
                metrics = self._train_step(batches)
                self.state.global_step += 1
                self.state.beta = self.kl.beta
                step = self.state.global_step
                elapsed = time.perf_counter() - started
                metrics["tokens_per_second"] = metrics.pop("real_tokens") / elapsed
                if step % c.logging_steps == 0 or step == self.state.max_steps:
                    self.metrics.log({"step": step, **metrics})
                if c.eval_steps and self.eval_store is not None and step % c.eval_steps == 0:
                    self.metrics.log({"step": step, **self.evaluate()})
                if c.save_steps and step % c.save_steps == 0:
                    self._save_checkpoint(state_after_this_cycle)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", beta=f"{self.kl.beta:.5f}")
        finally:
            if progress is not None:
                progress.close()
        self.state.log_history = self.metrics.history
        self.save_model(self.output_dir / "final")
        if self.dist.is_main:
            self._write_outputs()
        barrier(self.dist)  # no rank leaves (and tears down its process group) while rank 0 writes
        return self.state

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Eval loss and metrics with per-pair β_i from the current β; never updates β."""
        if self.eval_store is None:
            raise ValueError("no eval_dataset was given")
        self.model.eval()
        c = self.config
        size = c.per_device_eval_batch_size
        indices = np.arange(self.dist.rank, len(self.eval_store), self.dist.world_size, dtype=np.uint32)
        # Rank 0 holds the most pairs; under FSDP every rank must run as many forwards as it does.
        batches = math.ceil(math.ceil(len(self.eval_store) / self.dist.world_size) / size)
        sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        for start in range(0, batches * size, size):
            batch = self.collator(self.eval_store, indices[start : start + size])
            if len(batch["pair_ids"]) == 0:
                if self.sharded:
                    self._score(self._filler_batch(self.eval_store))
                continue
            pc, pr, rc, rr, steps = self._score(batch)
            betas, _ = self._pair_betas(batch, pc, pr, rc, rr, steps, train=False)
            losses, reward_c, reward_r = epsilon_dpo_loss(pc, pr, rc, rr, betas, c.label_smoothing)
            self._accumulate(sums, betas.cpu(), losses.cpu(), reward_c.cpu(), reward_r.cpu(), pc.cpu(), pr.cpu(),
                             steps.cpu(), batch)
        return self._metrics(all_reduce_sum(sums, self.dist), prefix="eval_")

    def save_model(self, path: str | Path) -> None:
        """The policy (and tokenizer) in Hugging Face format, loadable by `from_pretrained`. Every rank
        calls it (a sharded model is gathered first); rank 0 writes."""
        state = full_model_state(self.model) if self.sharded else None
        if not self.dist.is_main:
            return
        path = Path(path)
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

    # ------------------------------------------------------------------------ checkpoints, outputs
    def _save_checkpoint(self, sampler_state: bytes | None) -> None:
        """Every rank calls this. FSDP ranks each write their own shards; rank 0 writes the rest and
        renames the finished checkpoint into place."""
        if sampler_state is None:
            return
        step = self.state.global_step
        reference = self.ref_model if self.config.method == "tr_dpo" else None
        model, optimizer_state = self.model, None
        if self.sharded:
            if self.dist.is_main:
                begin_checkpoint(self.output_dir, step)
            barrier(self.dist)
            save_sharded(staging_dir(self.output_dir, step), self.model, self.optimizer, reference)
            model = reference = None
        elif self.dist.is_main:
            optimizer_state = self.optimizer.state_dict()
        if self.dist.is_main:
            save_checkpoint(
                self.output_dir, step, model=model, optimizer_state=optimizer_state, scheduler=self.scheduler,
                kl_state=self.kl.state_dict()["state"], sampler_state=sampler_state,
                trainer_state={"global_step": step, "max_steps": self.state.max_steps, "beta": self.kl.beta,
                               "world_size": self.dist.world_size, "log_history": self.metrics.history,
                               "beta_dpo_running_gap": None if self.beta_dpo is None else self.beta_dpo.running_gap},
                reference=reference, config=self.config.to_dict(), save_total_limit=self.config.save_total_limit,
                extra_state={"loss_scaler": self.precision.state_dict()},
            )
        barrier(self.dist)  # no rank moves on (or prunes, or resumes) before the checkpoint is in place

    def _claim_output_dir(self) -> None:
        """A fresh run starts in an output_dir without another run's outputs, so that neither its
        checkpoints nor its metrics mix with this run's (pruning, `resume=True` and metrics.jsonl
        would otherwise act on the old run)."""
        found = previous_run_outputs(self.output_dir)
        if found and not self.config.overwrite_output_dir:
            raise FileExistsError(
                f"output_dir {self.output_dir} holds another run's outputs ({', '.join(p.name for p in found[:5])}"
                f"{', ...' if len(found) > 5 else ''}): resume it (resume_from_checkpoint=True, `--resume`), choose "
                "another output_dir, or set overwrite_output_dir=True to delete them"
            )
        if found and self.dist.is_main:
            for path in found:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        barrier(self.dist)

    def _verify_checkpoint(self, path: Path) -> None:
        """Rank 0 checks the manifest (hashing a large checkpoint once, not once per rank); every rank
        learns the verdict."""
        error = None
        if self.dist.is_main:
            try:
                verify_checkpoint(path)
            except CheckpointError as caught:
                error = caught
        failed = all_reduce_sum(torch.tensor([float(error is not None)], dtype=torch.float64), self.dist).item()
        if error is not None:
            raise error
        if failed:
            raise CheckpointError(f"{path}: rank 0 found the checkpoint incomplete or altered")

    def _resume(self, path: Path) -> None:
        self._verify_checkpoint(path)
        saved_world = json.loads((path / TRAINER_STATE).read_text()).get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise CheckpointError(
                f"{path} was written by a run of {saved_world} rank(s), this run has {self.dist.world_size}: the "
                "data order and β bookkeeping are per world size, so resume with the same number of ranks (the "
                "weights alone are in final/ or load into any world size)"
            )
        restored = load_checkpoint(path, self.model, self.optimizer, self.scheduler,
                                   reference=self.ref_model if self.config.method == "tr_dpo" else None,
                                   sharded=self.sharded, verify=False)
        self.kl.load_state_dict({"state": restored["kl_state"]})
        self.sampler.load_state_dict({"state": restored["sampler_state"]})
        self.precision.load_state_dict(restored["extra_state"].get("loss_scaler", {}))
        trainer_state = restored["trainer_state"]
        self.state.global_step = trainer_state["global_step"]
        if len(self.kl.beta_history()) != self.state.global_step + 1 or trainer_state.get("beta") != self.kl.beta:
            raise CheckpointError(
                f"{path / TRAINER_STATE} says step {self.state.global_step} and β {trainer_state.get('beta')}, but the "
                f"KL controller state holds {len(self.kl.beta_history()) - 1} steps and β {self.kl.beta}"
            )
        if self.beta_dpo is not None:
            self.beta_dpo.running_gap = trainer_state.get("beta_dpo_running_gap")
        self.state.beta = self.kl.beta
        self.metrics.restore(trainer_state["log_history"])

    def _write_outputs(self) -> None:
        ledger = self.kl.ledger()
        np.savez(self.output_dir / "beta_ledger.npz", beta_history=self.kl.beta_history(), **ledger)
        if self.config.plots:
            from epsdpo.plots import plot_run

            plot_run(self.metrics.history, self.output_dir / "plots")
        self.metrics.close()

    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.output_dir)
