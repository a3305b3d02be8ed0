"""A run's checkpoints as the trainer sees them: what is saved after a step, how a run resumes, and
the folder a fresh run may claim. The file format (staging, manifest, weights-only loading) is
`epsdpo.checkpoint`'s; this module decides which of the trainer's parts go in and come back out,
and keeps every rank in step while rank 0 writes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from epsdpo.checkpoint import (
    TRAINER_STATE,
    CheckpointError,
    begin_checkpoint,
    load_checkpoint,
    previous_run_outputs,
    read_trainer_state,
    save_checkpoint,
    save_sharded,
    staging_dir,
    verify_checkpoint,
)
from epsdpo.distributed import DistInfo, all_reduce_sum, barrier

if TYPE_CHECKING:
    from epsdpo.trainer import Trainer


def save_run(trainer: Trainer, sampler_state: bytes) -> None:
    """Checkpoint the run after its current step. Every rank calls this: FSDP ranks each write their
    own shards; rank 0 writes the rest and renames the finished checkpoint into place."""
    t, step = trainer, trainer.state.global_step
    reference = t.ref_model if t.method.moves_reference else None
    model, optimizer_state = t.model, None
    if t.sharded:
        if t.dist.is_main:
            begin_checkpoint(t.output_dir, step)
        barrier(t.dist)
        save_sharded(staging_dir(t.output_dir, step), t.model, t.optimizer, reference)
        model = reference = None
    elif t.dist.is_main:
        optimizer_state = t.optimizer.state_dict()
    if t.dist.is_main:
        save_checkpoint(
            t.output_dir, step, model=model, optimizer_state=optimizer_state, scheduler=t.scheduler,
            kl_state=t.kl.state_dict()["state"], sampler_state=sampler_state,
            trainer_state={"global_step": step, "max_steps": t.state.max_steps, "beta": t.kl.beta,
                           "world_size": t.dist.world_size, "log_history": t.metrics.history,
                           "beta_rule": t.method.beta_rule.state_dict()},
            reference=reference, config=t.config.to_dict(), save_total_limit=t.config.save_total_limit,
            extra_state={"loss_scaler": t.precision.state_dict()}, pretrained=t.model, tokenizer=t.tokenizer,
        )
    barrier(t.dist)  # no rank moves on (or prunes, or resumes) before the checkpoint is in place


def resume_run(trainer: Trainer, path: Path) -> None:
    """Restore everything a checkpoint holds into the trainer, after checking that it is whole, that
    it was written by a run of the same world size, and that its step count agrees with its β state."""
    t = trainer
    _verify_once(path, t.dist, reference=t.method.moves_reference)
    saved_world = read_trainer_state(path).get("world_size", 1)
    if saved_world != t.dist.world_size:
        raise CheckpointError(
            f"{path} was written by a run of {saved_world} rank(s), this run has {t.dist.world_size}: the data "
            "order and β bookkeeping are per world size, so resume with the same number of ranks (the weights "
            "alone are in final/ or load into any world size)"
        )
    restored = load_checkpoint(path, t.model, t.optimizer, t.scheduler,
                               reference=t.ref_model if t.method.moves_reference else None,
                               sharded=t.sharded)
    t.kl.load_state_dict({"state": restored["kl_state"]})
    t.sampler.load_state_dict({"state": restored["sampler_state"]})
    t.precision.load_state_dict(restored["extra_state"].get("loss_scaler", {}))
    trainer_state = restored["trainer_state"]
    t.state.global_step = trainer_state["global_step"]
    if len(t.kl.beta_history()) != t.state.global_step + 1 or trainer_state.get("beta") != t.kl.beta:
        raise CheckpointError(
            f"{path / TRAINER_STATE} says step {t.state.global_step} and β {trainer_state.get('beta')}, but the KL "
            f"controller state holds {len(t.kl.beta_history()) - 1} steps and β {t.kl.beta}"
        )
    t.method.beta_rule.load_state_dict(trainer_state.get("beta_rule", {}))
    t.state.beta = t.kl.beta
    t.metrics.restore(trainer_state["log_history"])


def claim_output_dir(output_dir: Path, overwrite: bool, dist: DistInfo) -> None:
    """A fresh run starts in an output_dir without another run's outputs, so that neither its
    checkpoints nor its metrics mix with this run's (pruning, `resume=True` and metrics.jsonl would
    otherwise act on the old run). `overwrite` deletes them first."""
    found = previous_run_outputs(output_dir)
    if found and not overwrite:
        raise FileExistsError(
            f"output_dir {output_dir} holds another run's outputs ({', '.join(p.name for p in found[:5])}"
            f"{', ...' if len(found) > 5 else ''}): resume it (resume_from_checkpoint=True, `--resume`), choose "
            "another output_dir, or set overwrite_output_dir=True to delete them"
        )
    if found and dist.is_main:
        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    barrier(dist)


def _verify_once(path: Path, dist: DistInfo, reference: bool) -> None:
    """Rank 0 checks the manifest (hashing a large checkpoint once, not once per rank); every rank
    learns the verdict. `reference`: resume reads the moved reference's weights too."""
    error = None
    if dist.is_main:
        try:
            verify_checkpoint(path, reference)
        except CheckpointError as caught:
            error = caught
    failed = all_reduce_sum(torch.tensor([float(error is not None)], dtype=torch.float64), dist).item()
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"{path}: rank 0 found the checkpoint incomplete or altered")
