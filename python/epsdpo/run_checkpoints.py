"""A run's checkpoints as the trainer sees them: what is saved after a step, how a run resumes, and
the folder a fresh run may claim. The file format (staging, manifest, weights-only loading) is
`epsdpo.checkpoint`'s; this module decides which of the run's parts (`RunParts`, named by the
trainer) go in and come back out, and keeps every rank in step while rank 0 writes. An FSDP run,
whose every rank writes its own shards, needs an output_dir shared by all ranks: it checks that before its first step, and again on
each checkpoint, before a manifest could vouch for shards rank 0 cannot see.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed

from epsdpo.checkpoint import (
    PREFIX,
    RUN_STATE,
    SHARDED,
    TRAINING_CONFIG,
    CheckpointError,
    begin_checkpoint,
    load_checkpoint,
    previous_run_outputs,
    read_run_state,
    read_trainer_state,
    require_listed,
    resume_reads,
    rng_state,
    save_checkpoint,
    save_sharded,
    staging_dir,
    verify_checkpoint,
)
from epsdpo.beta_ledger import kl_state_files
from epsdpo.distributed import DistInfo, all_reduce_sum, any_rank, barrier, gather_bytes, on_main_rank
from epsdpo.sharding import full_model_state
from epsdpo.run_identity import (
    UnverifiedResumeWarning,
    allowed,
    differences,
    refusal,
    saved_identity,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, TrainerState

    from epsdpo._core import BatchSampler, KlController
    from epsdpo.config import TrainConfig
    from epsdpo.beta_rules import KlControlledBeta
    from epsdpo.precision import Precision
    from epsdpo.reporting import MetricsLog


@dataclass(frozen=True)
class RunParts:
    """What a checkpoint saves and a resume restores, by name. The objects are the run's own: a
    resume loads their state in place (the model's weights, the optimizer's moments, `state`'s
    counts); `resume_run` returns the one value it replaces (the list of resumes)."""

    config: TrainConfig
    dist: DistInfo
    output_dir: Path
    sharded: bool  # FSDP: every rank saves and loads its own shards
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tokenizer: PreTrainedTokenizerBase | None
    ref_model: torch.nn.Module | None
    moves_reference: bool  # the reference follows the policy (TR-DPO): it is saved and restored too
    kl: KlController
    beta_rule: KlControlledBeta
    sampler: BatchSampler
    precision: Precision
    state: TrainerState  # transformers' TrainerState, with the run's loss sum
    metrics: MetricsLog
    steps_per_epoch: int
    resumes: list[dict[str, Any]]
    identity: Callable[[], dict[str, Any]]  # the run's identity (epsdpo.run_identity), computed once


class OutputDirNotSharedError(RuntimeError):
    """output_dir is not one folder seen by every rank (node-local disks), and the run writes
    checkpoints from every rank (FSDP): its checkpoints would be incomplete on every node."""


def save_run(run: RunParts, sampler_state: bytes) -> None:
    """Checkpoint the run after its current step. Every rank calls this: FSDP ranks each write their
    own shards; rank 0 writes the rest and renames the finished checkpoint into place."""
    t, step = run, run.state.global_step
    # every rank's controller: β is the same on all of them, each rank's pair ledger is its own
    kl_states = gather_bytes(t.kl.state_dict()["state"], t.dist)
    kl_files = kl_state_files(t.dist.world_size)
    reference = t.ref_model if t.moves_reference else None
    model, optimizer_state = t.model, None
    # Each rank's own generators: with dropout on, every rank draws its own masks, so restoring rank 0's
    # state on every rank would not continue the run exactly
    rng_per_rank = _from_every_rank(rng_state(), t.dist)
    model_only = t.config.save_only_model
    if model_only:  # the weights alone, gathered whole from every rank's shards under FSDP (a collective)
        model = full_model_state(t.model) if t.sharded else t.model
        reference = None
    elif t.sharded:
        if t.dist.is_main:
            begin_checkpoint(t.output_dir, step)
        barrier(t.dist)
        save_sharded(staging_dir(t.output_dir, step), t.model, t.optimizer, reference)
        _require_every_shard(staging_dir(t.output_dir, step), t.dist)
        model = reference = None
    elif t.dist.is_main:
        optimizer_state = t.optimizer.state_dict()
    if t.config.metric_for_best_model is not None and t.state.best_global_step == step:
        # as transformers' Trainer names the checkpoint of the best evaluation when it saves one
        t.state.best_model_checkpoint = str(t.output_dir / f"{PREFIX}{step}")
    if t.dist.is_main:
        save_checkpoint(
            t.output_dir, step, model=model, optimizer_state=optimizer_state, scheduler=t.scheduler,
            kl_state=kl_states[0], sampler_state=sampler_state, rank_files=dict(zip(kl_files[1:], kl_states[1:])),
            trainer_state=t.state,
            run_state={"global_step": step, "max_steps": t.state.max_steps, "beta": t.kl.beta,
                       "world_size": t.dist.world_size, "beta_rule": t.beta_rule.state_dict(),
                       "run_identity": t.identity(), "resumes": t.resumes, "kl_state_files": kl_files,
                       "loss_sum": t.state.loss_sum, "loss_steps": t.state.loss_steps},
            reference=reference, config=t.config.to_dict(), save_total_limit=t.config.save_total_limit,
            extra_state={"loss_scaler": t.precision.state_dict()}, pretrained=t.model, tokenizer=t.tokenizer,
            rng_per_rank=rng_per_rank, model_only=model_only,
        )
    barrier(t.dist)  # no rank moves on (or prunes, or resumes) before the checkpoint is in place


def resume_run(run: RunParts, path: Path) -> list[dict[str, Any]]:
    """Restore everything a checkpoint holds into the trainer, after checking that it is whole, that
    it was written by a run with this run's training settings (epsdpo.run_identity; the world size
    first), and that its step count agrees with its β state. Changes `resume_allow_changes` lets
    through are applied over the restored optimizer and scheduler, and recorded: the run's resumes,
    this one last, are returned."""
    t = run
    # A moved reference is required only once the settings check has shown that the checkpoint's run
    # moved it too (else the settings differ, and that is the message to give)
    _verify_once(path, t.dist, reference=False)
    saved_state = read_run_state(path)
    saved_world = saved_state.get("world_size", 1)
    if saved_world != t.dist.world_size:
        raise CheckpointError(
            f"{path} was written by a run of {saved_world} rank(s), this run has {t.dist.world_size}: the data "
            "order and β bookkeeping are per world size, so resume with the same number of ranks (the weights "
            "alone are in final/ or load into any world size)"
        )
    changed = _check_identity(t, path, saved_state)
    if t.moves_reference and not t.sharded and not (path / "reference.safetensors").is_file():
        raise CheckpointError(
            f"{path} holds no reference.safetensors: this run's reference moves toward the policy (method="
            f"{t.config.method!r}, sync_ref_model={t.config.sync_ref_model}), but the run that wrote the checkpoint "
            "kept a fixed reference, so the moved reference to resume from does not exist"
        )
    if t.moves_reference:
        require_listed(path, resume_reads(path, reference=True))
    own_kl_state = _own_kl_state(t, path, saved_state)
    restored = load_checkpoint(path, t.model, t.optimizer, t.scheduler,
                               reference=t.ref_model if t.moves_reference else None,
                               sharded=t.sharded, rank=t.dist.rank)
    t.kl.load_state_dict({"state": restored["kl_state"] if own_kl_state is None else own_kl_state})
    t.sampler.load_state_dict({"state": restored["sampler_state"]})
    t.precision.load_state_dict(restored["extra_state"].get("loss_scaler", {}))
    trainer_state = read_run_state(path)
    t.state.global_step = trainer_state["global_step"]
    if len(t.kl.beta_history()) != t.state.global_step + 1 or trainer_state.get("beta") != t.kl.beta:
        raise CheckpointError(
            f"{path / RUN_STATE} says step {t.state.global_step} and β {trainer_state.get('beta')}, but the KL "
            f"controller state holds {len(t.kl.beta_history()) - 1} steps and β {t.kl.beta}"
        )
    t.beta_rule.load_state_dict(trainer_state.get("beta_rule", {}))
    t.state.beta = t.kl.beta
    _restore_progress(t, read_trainer_state(path), trainer_state)
    if changed:
        _apply_optimizer_settings(t)
    return [*trainer_state.get("resumes", []), {
        "step": t.state.global_step, "checkpoint": path.name,
        "changed": {key: list(values) for key, values in changed.items()}}]


def _restore_progress(t: RunParts, hf_state: dict[str, Any], run_state: dict[str, Any]) -> None:
    """What transformers' TrainerState carries on (the logged history, epoch, tokens seen, best metric)
    and the training-loss sum for train_loss. A checkpoint written before trainer_state.json was
    transformers' lacks all but the history: the counts then start at the resumed step."""
    t.metrics.restore(hf_state["log_history"])
    t.state.epoch = float(hf_state.get("epoch", t.state.global_step / t.steps_per_epoch))
    t.state.num_input_tokens_seen = int(hf_state.get("num_input_tokens_seen", 0))
    for key in ("best_metric", "best_global_step", "best_model_checkpoint"):
        setattr(t.state, key, hf_state.get(key))
    t.state.loss_sum = float(run_state.get("loss_sum", 0.0))
    t.state.loss_steps = int(run_state.get("loss_steps", 0))


def _own_kl_state(t: RunParts, path: Path, saved_state: dict) -> bytes | None:
    """This rank's KL controller state when the checkpoint keeps one per rank and this is not rank 0
    (None: the checkpoint's kl_controller.bin, which load_checkpoint reads). Every rank learns whether
    any rank could not read its own, so that all stop together instead of waiting for that one."""
    names = saved_state.get("kl_state_files")
    if names is None:  # written before checkpoints kept every rank's ledger
        if t.dist.world_size > 1:
            warnings.warn(f"{path} holds rank 0's KL controller only (it was written before checkpoints kept every "
                          "rank's): every rank resumes rank 0's pair ledger, so beta_ledger.npz books rank 0's pairs "
                          "before the resumed step once per rank and the other ranks' not at all",
                          stacklevel=3)
        return None
    error, state = None, None
    try:
        if names != kl_state_files(t.dist.world_size):
            raise CheckpointError(f"{path / RUN_STATE}: kl_state_files is {str(names)[:200]}, not the "
                                  f"{t.dist.world_size} per-rank files of kl_controller*.bin this version writes")
        if t.dist.rank > 0:
            require_listed(path, [names[t.dist.rank]])
            state = (path / names[t.dist.rank]).read_bytes()
    except (CheckpointError, OSError) as caught:
        error = caught if isinstance(caught, CheckpointError) else CheckpointError(
            f"{path / names[t.dist.rank]} is unreadable: {type(caught).__name__}: {str(caught)[:200]}")
    if any_rank(error is not None, t.dist):
        raise error or CheckpointError(f"{path}: another rank could not read its KL controller state")
    return state


def _check_identity(t: RunParts, path: Path, saved_state: dict) -> dict[str, tuple]:
    """The differences between the checkpoint's run and this one that resume_allow_changes allows;
    any other difference is a CheckpointError listing them all."""
    config = json.loads((path / TRAINING_CONFIG).read_text()) if (path / TRAINING_CONFIG).is_file() else {}
    saved = saved_identity(saved_state, config)
    if saved is None:
        raise CheckpointError(f"{path / TRAINING_CONFIG} is not a config this version reads, so the checkpoint "
                              "cannot be matched to this run: start a new run from its weights")
    diffs = differences(saved, t.identity())
    allow = allowed(t.config)
    if any(key not in allow for key in diffs):
        raise CheckpointError(refusal(path, diffs, allow))
    if "run_identity" not in saved_state:
        warnings.warn(f"{path} was written before checkpoints recorded fingerprints of their training data and "
                      "tokenizer: its settings are compared, its data and tokenizer are not",
                      UnverifiedResumeWarning, stacklevel=3)
    return diffs


def _apply_optimizer_settings(t: RunParts) -> None:
    """This run's learning rate, schedule, weight decay, Adam betas and Adam ε over the restored optimizer
    and scheduler state (which hold the checkpoint's): the scheduler, built from this run's config,
    continues from the checkpoint's step, and the first step after resuming uses its rate."""
    c = t.config
    t.scheduler.base_lrs = [c.learning_rate] * len(t.optimizer.param_groups)
    for group, decay, schedule in zip(t.optimizer.param_groups, (c.weight_decay, 0.0), t.scheduler.lr_lambdas):
        group.update(initial_lr=c.learning_rate, weight_decay=decay, betas=(c.adam_beta1, c.adam_beta2),
                     eps=c.adam_epsilon, lr=c.learning_rate * schedule(t.scheduler.last_epoch))
    t.scheduler._last_lr = [group["lr"] for group in t.optimizer.param_groups]


def claim_output_dir(output_dir: Path, overwrite: bool, dist: DistInfo, restarted: bool = False) -> None:
    """A fresh run starts in an output_dir without another run's outputs, so that neither its
    checkpoints nor its metrics mix with this run's (pruning, `resume=True` and metrics.jsonl would
    otherwise act on the old run). `overwrite` deletes them first. `restarted` (a torchelastic restart
    that found no complete checkpoint): what the killed attempt left (metrics.jsonl, plots, staging
    folders) is this run's own, and is deleted too; a finished run's final/ or beta_ledger.npz is not.
    Rank 0 decides, on its view of output_dir, and every rank learns its verdict."""
    def claim() -> None:
        found = previous_run_outputs(output_dir)
        finished = [p for p in found if p.name in ("final", "beta_ledger.npz")]
        if found and not (overwrite or (restarted and not finished)):
            why = (f"a torchelastic restart found no complete checkpoint, and {finished[0].name} is a finished run's "
                   "output, not a killed attempt's: " if restarted else "")
            raise FileExistsError(
                f"output_dir {output_dir} holds another run's outputs ({', '.join(p.name for p in found[:5])}"
                f"{', ...' if len(found) > 5 else ''}): {why}resume it (resume_from_checkpoint=True, `--resume`), "
                "choose another output_dir, or set overwrite_output_dir=True to delete them"
            )
        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    on_main_rank(claim, dist, (OSError,),
                 lambda: FileExistsError(f"rank 0 found another run's outputs in output_dir {output_dir} (its error "
                                         "says which)"))
    barrier(dist)


def _verify_once(path: Path, dist: DistInfo, reference: bool) -> None:
    """Rank 0 checks the manifest (hashing a large checkpoint once, not once per rank); every rank
    learns the verdict. `reference`: resume reads the moved reference's weights too."""
    on_main_rank(lambda: verify_checkpoint(path, reference), dist, (CheckpointError,),
                 lambda: CheckpointError(f"{path}: rank 0 found the checkpoint incomplete or altered"))


def require_shared_output_dir(output_dir: Path, dist: DistInfo) -> None:
    """Before any step of a run whose every rank writes checkpoint files (FSDP's shards): stop every
    rank together unless each one sees the file rank 0 writes into output_dir, with rank 0's random
    token in it. Node-local disks give each node its own output_dir under the same name, and each
    checkpoint would then lack the other nodes' shards."""
    if not dist.enabled:
        return
    token = torch.zeros(16, dtype=torch.float64)
    if dist.is_main:
        token = torch.tensor(list(secrets.token_bytes(16)), dtype=torch.float64)
    token_hex = bytes(int(v) for v in all_reduce_sum(token, dist).tolist()).hex()  # rank 0's token on every rank
    # a name never looked up before: a network file system cannot answer from a cached "no such file"
    probe = output_dir / f".epsdpo-storage-probe-{token_hex}"

    def write_probe() -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as handle:
            handle.write(token_hex)
            handle.flush()
            os.fsync(handle.fileno())

    on_main_rank(write_probe, dist, (OSError,),
                 lambda: OSError(f"rank 0 could not write a probe file into output_dir {output_dir} "
                                 "(its error says why)"))
    try:
        seen = probe.read_text()[:64] == token_hex
    except (OSError, UnicodeDecodeError):
        seen = False
    unseen = torch.zeros(dist.world_size, dtype=torch.float64)
    unseen[dist.rank] = float(not seen)
    blind = [rank for rank, flag in enumerate(all_reduce_sum(unseen, dist).tolist()) if flag]
    barrier(dist)  # every rank has looked before rank 0 removes the probe
    if dist.is_main:
        probe.unlink(missing_ok=True)
    if blind:
        raise OutputDirNotSharedError(
            f"output_dir {output_dir} is not one folder shared by every rank: rank(s) {', '.join(map(str, blind))} "
            "do not see the file rank 0 wrote there (node-local disks?), and with fsdp every rank writes its own "
            "shards of each checkpoint into it, so no checkpoint would be whole: give every node the same shared "
            "output_dir (a network file system), or train without fsdp"
        )


def _require_every_shard(staging: Path, dist: DistInfo) -> None:
    """Every file any rank wrote into the sharded checkpoint is there, with that size, where rank 0
    will list it in the manifest; otherwise every rank stops together before a manifest is written
    (it would verify a checkpoint lacking other ranks' shards). Catches storage that stopped being
    shared after `require_shared_output_dir` passed."""
    if not dist.enabled:
        return
    root = staging / SHARDED
    seen = {p.relative_to(staging).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()} \
        if root.is_dir() else {}
    views = _from_every_rank(seen, dist)

    def check() -> None:
        for rank, view in enumerate(views[1:], start=1):
            lacking = sorted(name for name, size in view.items() if views[0].get(name) != size)
            if lacking:
                raise OutputDirNotSharedError(
                    f"{staging.name}: rank {rank} wrote {', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''}, "
                    f"which rank 0 does not see (or sees with another size) in its output_dir {staging.parent}: "
                    "output_dir is not one folder shared by every rank, so the checkpoint would be incomplete and "
                    "no manifest is written; give every node the same shared output_dir, or train without fsdp"
                )

    on_main_rank(check, dist, (OutputDirNotSharedError,),
                 lambda: OutputDirNotSharedError(f"{staging.name}: rank 0 does not see every rank's shards in its "
                                                 "output_dir (its error says which): output_dir is not shared"))


def _from_every_rank(value: Any, dist: DistInfo) -> list[Any]:
    """`value` of every rank, in rank order, on every rank (a collective). Pickled between this run's
    own processes only: nothing read from a file goes through it."""
    if not dist.enabled:
        return [value]
    gathered: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered
