"""Checkpoints that are complete or absent, verified before use, and never executed.

A checkpoint holds everything a resumed run needs to continue exactly: the policy weights, optimizer
and scheduler state, the KlController state (β, its history and the per-pair ledger; the official
ε-DPO code loses β here), the sampler position, every RNG state of every rank (each rank draws its
own dropout masks) and the run's config and trainer state. It is written to a temporary directory
and renamed into place, so a crash leaves either the whole checkpoint or none.

- Weights: `model.safetensors` (and `reference.safetensors` when TR-DPO moves the reference) for
  one process or DDP. FSDP runs write `sharded/` with `torch.distributed.checkpoint` instead: every
  rank writes its own shards, and no rank ever holds the whole model. A checkpoint resumes into a run
  of its own kind (FSDP or not); the other way round is refused by name. DCP's `.metadata` file is a
  pickle that `torch.distributed.checkpoint` reads with the standard unpickler, so an FSDP
  checkpoint, unlike the others, must come from a source you trust.
- A checkpoint is also a model folder, as a TRL checkpoint is: next to `model.safetensors` lie the
  policy's `config.json` and `generation_config.json` (a PEFT policy: `adapter_config.json` and
  `adapter_model.safetensors`, as PEFT writes them) and the tokenizer's files, so that
  `AutoModelForCausalLM.from_pretrained("checkpoint-N")` loads the policy of step N. The run's own
  settings are in `training_config.json`; `trainer_state.json` is transformers' TrainerState
  (`TrainerState.load_from_json` reads it), and epsdpo's own state (β, the β rule, the run's
  identity, the per-rank ledger files) is `epsdpo_state.json` beside it. A sharded (FSDP) checkpoint
  has `config.json` but no `model.safetensors`, so `from_pretrained` cannot read it: its weights are
  DCP shards, for resuming (or for `torch.distributed.checkpoint.format_utils.dcp_to_torch_save`);
  `final/` holds the gathered model.
- Outside `sharded/`, nothing is unpickled with arbitrary classes: `training_state.pt` is read with
  `torch.load(weights_only=True)`, which accepts tensors and plain containers only.
- `manifest.json`, written last, lists every file's size and SHA-256. Its presence marks a finished
  checkpoint, and resuming verifies every entry and names the file that does not match. The manifest
  must be a regular file of at most 16 MiB (a FIFO would block resume forever, a link to /dev/zero
  fill memory) and must list every file resume reads (`resume_reads`: the weights, every file of
  `sharded/`, the training, KL, sampler, trainer and config state): a manifest listing less (`{"files":
  {}}`) would verify nothing and leave those files loaded unchecked. Each listed file must be a regular
  file inside the checkpoint. A file the manifest does not list is ignored: resume never reads it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_file, save_model
from torch import nn

PREFIX = "checkpoint-"
MANIFEST = "manifest.json"  # written last: its presence marks a finished checkpoint
TRAINER_STATE = "trainer_state.json"  # transformers' TrainerState, as TrainerState.save_to_json writes it
RUN_STATE = "epsdpo_state.json"  # epsdpo's own: β, its rule's state, the run's identity, per-rank ledger files
TRAINING_CONFIG = "training_config.json"  # the TrainConfig; config.json is the model's, as from_pretrained expects
SHARDED = "sharded"
# What resume reads besides the weights (`resume_reads`): each must be in the manifest, or it is read unchecked.
RESUME_STATE_FILES = ("training_state.pt", "kl_controller.bin", "sampler.bin", TRAINER_STATE, TRAINING_CONFIG)
MODEL_ONLY = "save_only_model"  # epsdpo_state.json's mark of a checkpoint without resume state
MAX_MANIFEST_BYTES = 16 << 20  # a manifest lists a few dozen files (thousands for FSDP shards): kilobytes
# what save_pretrained writes in a safetensors header; transformers 4.x's from_pretrained refuses a file
# whose metadata lacks it (safetensors' save_model writes metadata of its own for tied weights)
SAFETENSORS_METADATA = {"format": "pt"}


class CheckpointError(ValueError):
    """A checkpoint is incomplete, altered or does not belong to this run; names the file."""


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain values, so that a weights-only load can read it back."""
    _, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_weights(weights: nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    write_file(path, lambda target: _save_weights_unchecked(weights, target))


def _save_weights_unchecked(weights: nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    if isinstance(weights, dict):
        # safetensors refuses tensors that share storage (tied embeddings): copy all but the first
        seen: set[int] = set()
        state = {}
        for name, tensor in weights.items():
            tensor = tensor.contiguous()
            state[name] = tensor.clone() if tensor.data_ptr() in seen else tensor
            seen.add(tensor.data_ptr())
        save_file(state, str(path), metadata=dict(SAFETENSORS_METADATA))
    else:
        save_model(weights, str(path), metadata=dict(SAFETENSORS_METADATA))


def save_pretrained_files(folder: Path, model: nn.Module, tokenizer: Any = None) -> None:
    """What `from_pretrained` reads next to `model.safetensors`: the model's `config.json` and
    `generation_config.json`, or a PEFT policy's adapter files; and the tokenizer's files (a few MB,
    so that a checkpoint is a complete model folder, as TRL's are).

    The weights file itself holds the module's own state dict, which is what a transformers model
    loads; a PEFT policy's holds the wrapped names instead, so its `config.json` would load a base
    model with every weight missing: it gets the adapter files, which load the base model named in
    them and apply the adapter of this step."""
    from epsdpo.models import is_peft_model

    if is_peft_model(model):
        _save_adapter(folder, model)
    elif hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
        config = copy.deepcopy(model.config)
        # as save_pretrained does: the class (FSDP2 renames it) and the dtype of the weights written
        config.architectures = [type(model).__name__.removeprefix("FSDP")]
        if isinstance(getattr(model, "dtype", None), torch.dtype):
            config.dtype = str(model.dtype).removeprefix("torch.")
        write_file(folder / "config.json", lambda _: config.save_pretrained(folder))
        generation = getattr(model, "generation_config", None)
        if generation is not None and callable(getattr(model, "can_generate", None)) and model.can_generate():
            write_file(folder / "generation_config.json", lambda _: generation.save_pretrained(folder))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        write_file(folder, lambda _: tokenizer.save_pretrained(folder))


def _save_adapter(folder: Path, model: nn.Module) -> None:
    from peft import get_peft_model_state_dict

    name = model.active_adapter
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    write_file(folder / "adapter_model.safetensors",
               lambda path: save_file(state, str(path), metadata=dict(SAFETENSORS_METADATA)))
    write_file(folder / "adapter_config.json", lambda _: model.peft_config[name].save_pretrained(folder))


def staging_dir(output_dir: Path, step: int) -> Path:
    """Where checkpoint `step` is written before it is renamed into place."""
    return output_dir / f".{PREFIX}{step}.tmp"


def begin_checkpoint(output_dir: Path, step: int) -> Path:
    """A fresh, empty staging directory (rank 0 calls this before any rank writes into it)."""
    tmp = staging_dir(output_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                   reference: nn.Module | None) -> dict[str, Any]:
    """The state dicts DCP reads and writes: sharded (DTensor) under FSDP, plain tensors otherwise."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    if reference is not None:
        state["reference"] = get_model_state_dict(reference)
    return state


def save_sharded(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 reference: nn.Module | None = None) -> None:
    """Every rank writes its own shards of the weights and optimizer state (a collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(model, optimizer, reference), checkpoint_id=str(tmp / SHARDED))


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: nn.Module | dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any] | None,
    scheduler: Any,
    kl_state: bytes,
    sampler_state: bytes,
    trainer_state: Any,
    config: dict[str, Any],
    save_total_limit: int | None = None,
    reference: nn.Module | dict[str, torch.Tensor] | None = None,
    extra_state: dict[str, Any] | None = None,
    pretrained: nn.Module | None = None,
    tokenizer: Any = None,
    rng_per_rank: list[dict[str, Any]] | None = None,
    rank_files: dict[str, bytes] | None = None,
    model_only: bool = False,
    run_state: dict[str, Any] | None = None,
) -> Path:
    """Finish checkpoint `step` and rename it into place (rank 0).

    `model` (and `reference`, saved when it changes during training: TR-DPO) come as modules or full
    state dicts; pass `model=None` and `optimizer_state=None` when `save_sharded` has already written
    them into the staging directory. `config`: the run's settings (`training_config.json`).
    `extra_state`: more tensors and plain values to restore (the fp16 loss scale). `pretrained`: the
    policy whose Hugging Face config (and `tokenizer`, whose files) make the checkpoint a folder
    `from_pretrained` loads (`save_pretrained_files`); by default `model` when it is a module.
    `rng_per_rank`: every rank's `rng_state()`, in rank order (by default this process's alone).
    `rank_files`: the other ranks' state, by file name (their KL controllers: epsdpo.beta_ledger),
    written and listed in the manifest like the rest. `trainer_state`: transformers' TrainerState
    (written with its save_to_json) or a mapping; `run_state`: epsdpo's own state, beside it.
    `model_only` (save_only_model): the weights, the model folder's files and the JSON files alone, without the state resuming needs; such a
    checkpoint loads with from_pretrained and is refused as a resume point (`verify_checkpoint`)."""
    final = output_dir / f"{PREFIX}{step}"
    tmp = staging_dir(output_dir, step)
    if model is None:
        if not (tmp / SHARDED).is_dir():
            raise CheckpointError(f"{tmp}: no sharded weights were written before finishing the checkpoint")
    else:
        begin_checkpoint(output_dir, step)  # never finish a staging dir a crashed run left behind
        _save_weights(model, tmp / "model.safetensors")
        if reference is not None:
            _save_weights(reference, tmp / "reference.safetensors")
    if pretrained is None and isinstance(model, nn.Module):
        pretrained = model
    if pretrained is not None:
        save_pretrained_files(tmp, pretrained, tokenizer)
    if model_only:
        # marked in epsdpo's own state: trainer_state.json stays transformers' TrainerState
        write_file(tmp / TRAINING_CONFIG, lambda path: path.write_bytes(json.dumps(config, indent=2).encode()))
        _write_states(tmp, trainer_state, {**(run_state or {}), MODEL_ONLY: True})
        return _finish(output_dir, tmp, final, save_total_limit)
    rng_per_rank = rng_per_rank or [rng_state()]
    # "rng" stays rank 0's state, as checkpoints before per-rank states held it
    training = {"scheduler": scheduler.state_dict(), "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank,
                "extra": extra_state or {}}
    if optimizer_state is not None:
        training["optimizer"] = optimizer_state
    write_file(tmp / "training_state.pt", lambda path: torch.save(training, path))
    for name, data in (("kl_controller.bin", kl_state), ("sampler.bin", sampler_state),
                       (TRAINING_CONFIG, json.dumps(config, indent=2).encode())):
        write_file(tmp / name, lambda path, data=data: path.write_bytes(data))
    _write_states(tmp, trainer_state, run_state)
    for name, data in (rank_files or {}).items():
        write_file(tmp / name, lambda path, data=data: path.write_bytes(data))
    return _finish(output_dir, tmp, final, save_total_limit)


def _write_states(tmp: Path, trainer_state: Any, run_state: dict[str, Any] | None) -> None:
    """transformers' TrainerState (its own save_to_json, or a mapping) and epsdpo's state beside it."""
    if hasattr(trainer_state, "save_to_json"):
        write_file(tmp / TRAINER_STATE, lambda path: trainer_state.save_to_json(str(path)))
    else:
        write_file(tmp / TRAINER_STATE, lambda path: path.write_text(json.dumps(trainer_state, indent=2)))
    if run_state is not None:
        write_file(tmp / RUN_STATE, lambda path: path.write_bytes(json.dumps(run_state, indent=2).encode()))


def _finish(output_dir: Path, tmp: Path, final: Path, save_total_limit: int | None) -> Path:
    """The manifest written last, then the staged checkpoint renamed into place and old ones pruned."""
    _write_manifest(tmp)
    if final.exists():  # resumed from an earlier step: this step's old checkpoint is replaced
        _discard(final)
    os.replace(tmp, final)
    if save_total_limit:
        prune_checkpoints(output_dir, keep=final, limit=save_total_limit)
    return final


def prune_checkpoints(output_dir: Path, keep: Path, limit: int) -> None:
    """Leave at most `limit` checkpoints, never deleting `keep` (the one just written). Checkpoints of
    later steps than `keep` belong to a future this run abandoned by resuming earlier: they go first."""
    step = int(keep.name.removeprefix(PREFIX))
    others = [p for p in list_checkpoints(output_dir) if p != keep]
    abandoned = [p for p in others if int(p.name.removeprefix(PREFIX)) > step]
    older = [p for p in others if int(p.name.removeprefix(PREFIX)) < step]
    for old in (abandoned + older)[: max(len(others) + 1 - limit, 0)]:
        _discard(old)


def _discard(checkpoint: Path) -> None:
    """Remove a checkpoint so that a crash midway never leaves a listed, half-deleted one: it stops
    being a checkpoint (renamed) before any of its files goes."""
    trash = checkpoint.with_name(f".{checkpoint.name}.trash")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def previous_run_outputs(output_dir: Path) -> list[Path]:
    """What a run writes into its output_dir, found there before this run wrote anything."""
    if not output_dir.is_dir():
        return []
    names = {"metrics.jsonl", "final", "beta_ledger.npz", "plots", TRAINER_STATE}
    if (output_dir / "final").is_dir():  # the final model's copy in output_dir itself (Trainer._write_outputs)
        names |= {p.name for p in (output_dir / "final").iterdir()}
    # what a killed run leaves too: staging and trash folders (checkpoints, final/), temporary
    # ledgers (epsdpo.staged); not the run lock, which belongs to whichever run holds the folder
    leftovers = rf"\.?{PREFIX}\d+(\.tmp|\.trash)?|\.final\.(tmp|trash)|\.(beta_ledger\.npz|trainer_state\.json)\.tmp"
    return sorted(p for p in output_dir.iterdir() if p.name in names or re.fullmatch(leftovers, p.name))


def write_file(path: Path, writer: Any) -> None:
    """Run a writer, naming the file when it fails: on a full disk torch.save says only 'iostream
    error', safetensors raises its own SafetensorError, and Path.write_bytes an OSError without the
    file's name. An OSError keeps its errno and strerror (ENOSPC, EFBIG: `error.errno` tells a full
    disk from the rest) and gets this file as its filename, so that its message shows all three; an
    error with no errno becomes a FileWriteError naming the file and quoting the writer's error."""
    try:
        writer(path)
    except Exception as error:  # noqa: BLE001 - each library fails in its own type; all mean "not written"
        code = getattr(error, "errno", None)
        if isinstance(error, OSError) and isinstance(code, int):
            failure = OSError(code, error.strerror or os.strerror(code), str(path))  # "[Errno 28] No space left on device: '<file>'"
        else:
            failure = FileWriteError(f"could not write {path}: {type(error).__name__}: {error}")
            failure.filename = str(path)
        raise failure from error


class FileWriteError(OSError):
    """A write failed with no errno (torch.save's 'iostream error', safetensors' own errors): an OSError
    naming the file in `filename`, whose message is never OSError's '[Errno None] None: <file>'."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.errno is None and self.args else super().__str__()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(root: Path) -> None:
    entries = {}
    for path in _files(root):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        entries[path.relative_to(root).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = root / MANIFEST
    write_file(manifest, lambda path: path.write_text(json.dumps({"format": 1, "files": entries}, indent=1)))
    with open(manifest, "rb") as handle:
        os.fsync(handle.fileno())


def resume_reads(path: Path, reference: bool = False) -> list[str]:
    """Every file (relative to `path`) that resuming from checkpoint `path` reads: its weights
    (`reference`: also the moved reference's, as TR-DPO resumes it; FSDP: every file of `sharded/`,
    which DCP reads as its pickled metadata says) and its state files."""
    if (path / SHARDED).is_dir():
        weights = sorted(p.relative_to(path).as_posix() for p in (path / SHARDED).rglob("*") if not p.is_dir())
    else:
        weights = ["model.safetensors", *(["reference.safetensors"] if reference else [])]
    return [*weights, *RESUME_STATE_FILES]


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest's `files` mapping, read as a regular file of bounded size and checked entry by entry."""
    from epsdpo.safe_files import FileRefused, read_regular_file

    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(read_regular_file(manifest_path, MAX_MANIFEST_BYTES))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete epsdpo checkpoint (no {MANIFEST})") from None
    except FileRefused as error:
        raise CheckpointError(f"{manifest_path} {error.reason}, so it is not read") from None
    except (OSError, ValueError, RecursionError) as error:  # unreadable, not UTF-8, not JSON, nested too deeply
        raise CheckpointError(f"{manifest_path} is unreadable: {type(error).__name__}: {str(error)[:200]}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest_path} is unreadable: it holds no 'files' mapping")
    for name, entry in files.items():
        inside = not name.startswith("/") and ".." not in name.split("/") and "\\" not in name and name != ""
        if not inside:
            raise CheckpointError(f"{manifest_path} lists {name[:200]!r}, which is not a file inside the checkpoint")
        if not (isinstance(entry, dict) and type(entry.get("size")) is int and isinstance(entry.get("sha256"), str)):
            raise CheckpointError(f"{manifest_path}: the entry of {name!r} is not {{size: an integer, sha256: a string}}")
    return files


def verify_checkpoint(path: Path, reference: bool = False) -> None:
    """The manifest is a regular file of bounded size that lists every file resuming reads
    (`resume_reads`; `reference`: the run resumes a moving reference), and every file it lists is a
    regular file with its size and SHA-256; raises CheckpointError naming the first that is not. A
    checkpoint written with save_only_model is refused as what it is, not as an incomplete one."""
    listed = _read_manifest(path)
    if "training_state.pt" not in listed and (RUN_STATE in listed or TRAINER_STATE in listed):
        state_file = RUN_STATE if RUN_STATE in listed else TRAINER_STATE
        _verify_file(path / state_file, listed[state_file])
        if _read_json_object(path / state_file).get(MODEL_ONLY) is True:
            raise CheckpointError(f"{path} was written with save_only_model=True: it holds the model alone, without "
                                  "the optimizer, scheduler, sampler and β state a resume needs; start a new run "
                                  "from its weights (model: the checkpoint folder) instead")
    files = require_listed(path, resume_reads(path, reference))
    for name, entry in files.items():
        _verify_file(path / name, entry)


def require_listed(path: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """The manifest's entries, after checking that it lists every one of `names` (a file resume reads
    that the manifest leaves out would be loaded unverified)."""
    files = _read_manifest(path)
    unlisted = [name for name in names if name not in files]
    if unlisted:
        raise CheckpointError(f"{path / MANIFEST} does not list {', '.join(unlisted[:5])}"
                              f"{f' and {len(unlisted) - 5} more' if len(unlisted) > 5 else ''}, which resuming reads: "
                              "the checkpoint is incomplete or its manifest was replaced")
    return files


def _verify_file(file: Path, entry: dict[str, Any]) -> None:
    """One listed file: opened without blocking and refused unless regular (a FIFO or a device listed
    in a manifest would hang or never end the hash), then its size and SHA-256."""
    from epsdpo.safe_files import FileRefused, open_regular_file, why_unreadable

    try:
        fd = open_regular_file(file)
    except (OSError, FileRefused) as error:
        raise CheckpointError(f"{file} is listed in {MANIFEST}, but: {why_unreadable(error)}") from None
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size != entry["size"]:
            raise CheckpointError(f"{file} has {size} bytes, the manifest says {entry['size']}: truncated or replaced")
        digest = hashlib.sha256()
        while block := handle.read(1 << 22):
            digest.update(block)
    if digest.hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{file} does not match its SHA-256 in {MANIFEST}: the file was altered or corrupted")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.exists():
        return []
    found = []
    for path in output_dir.iterdir():
        match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
        if match and (path / MANIFEST).exists():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: Path, resume: str | Path | bool) -> Path:
    """`True` means the newest complete checkpoint in `output_dir`."""
    if resume is True:
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"no complete checkpoint under {output_dir} to resume from")
        return found[-1]
    path = Path(resume)
    if not (path / MANIFEST).exists():
        raise FileNotFoundError(f"{path} is not a complete epsdpo checkpoint (no {MANIFEST})")
    return path


def read_trainer_state(path: Path) -> dict[str, Any]:
    """trainer_state.json of a verified checkpoint, as a mapping; anything else (nested past the
    recursion limit, not an object: checksums can be recomputed) is a CheckpointError naming it."""
    return _read_json_object(path / TRAINER_STATE)


def read_run_state(path: Path) -> dict[str, Any]:
    """epsdpo's own state of a verified checkpoint (step, β, the β rule's state, the run's identity, the
    per-rank ledger files): `epsdpo_state.json` when the manifest lists it, beside transformers'
    trainer_state.json; a checkpoint written before the two were apart kept it in trainer_state.json."""
    if RUN_STATE in require_listed(path, []):
        return _read_json_object(path / RUN_STATE)
    state = read_trainer_state(path)
    if "beta" not in state:
        raise CheckpointError(f"{path} holds neither {RUN_STATE} nor β in {TRAINER_STATE}: it is not an epsdpo "
                              "checkpoint this version resumes (its weights still load with from_pretrained)")
    return state


def _read_json_object(file: Path) -> dict[str, Any]:
    try:
        state = json.loads(file.read_bytes())
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{file} is unreadable: {type(error).__name__}: {str(error)[:200]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} is unreadable: a JSON {type(state).__name__}, not an object")
    return state


def _load_training_state(path: Path) -> dict[str, Any]:
    file = path / "training_state.pt"
    if not file.is_file():  # else torch.load's FileNotFoundError would read as "not tensors" below
        raise CheckpointError(f"{file} is missing: the checkpoint has no optimizer, scheduler and RNG state to "
                              "resume from")
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - the unpickler raises many kinds; all mean "not ours"
        raise CheckpointError(f"{file} holds something other than tensors and plain values, so it is not "
                              f"loaded ({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None


def _rng_of_rank(training: dict[str, Any], rank: int, path: Path) -> dict[str, Any]:
    """Rank `rank`'s RNG state. A checkpoint written before per-rank states holds rank 0's alone,
    which every rank restores (dropout then draws other masks on ranks > 0 than the run would have)."""
    per_rank = training.get("rng_per_rank")
    if per_rank is None:
        return training["rng"]
    if not isinstance(per_rank, list) or rank >= len(per_rank):
        count = len(per_rank) if isinstance(per_rank, list) else "no list of"
        raise CheckpointError(f"{path / 'training_state.pt'} holds {count} per-rank RNG states, so rank {rank} "
                              "has none to restore")
    return per_rank[rank]


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    reference: nn.Module | None = None, sharded: bool = False, rank: int = 0) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint `verify_checkpoint` has passed;
    return the rest for the trainer to apply. `sharded`: the models are FSDP-sharded (every rank
    calls this). `rank`: this process's rank, whose own RNG state is restored."""
    training = _load_training_state(path)
    if (path / SHARDED).is_dir() != sharded:
        written, running = ("with", "without") if (path / SHARDED).is_dir() else ("without", "with")
        raise CheckpointError(f"{path} was written by a run {written} FSDP and this run is {running} it: resume "
                              f"with fsdp={not sharded}, or start a new run from the checkpoint's weights")
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        state = _sharded_state(model, optimizer, reference)
        dcp.load(state, checkpoint_id=str(path / SHARDED))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if reference is not None:
            set_model_state_dict(reference, state["reference"])
    else:
        load_model(model, str(path / "model.safetensors"))
        if reference is not None:
            load_model(reference, str(path / "reference.safetensors"))
        optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    set_rng_state(_rng_of_rank(training, rank, path))
    return {
        "kl_state": (path / "kl_controller.bin").read_bytes(),
        "sampler_state": (path / "sampler.bin").read_bytes(),
        "trainer_state": read_trainer_state(path),
        "extra_state": training.get("extra", {}),
    }
