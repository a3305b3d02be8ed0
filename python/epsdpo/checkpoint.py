"""Checkpoints that are complete or absent: written to a temporary directory, then renamed.

A checkpoint holds everything a resumed run needs to continue exactly: the policy weights
(safetensors), optimizer and scheduler state, the KlController state (β, its history and the
per-pair ledger; the official ε-DPO code loses β here), the sampler position, every RNG state and
the run's config and trainer state.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

PREFIX = "checkpoint-"
_COMPLETE = "trainer_state.json"  # written last: its presence marks a finished checkpoint


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_weights(weights: nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    if isinstance(weights, dict):
        # safetensors refuses tensors that share storage (tied embeddings): copy all but the first
        seen: set[int] = set()
        state = {}
        for name, tensor in weights.items():
            tensor = tensor.contiguous()
            state[name] = tensor.clone() if tensor.data_ptr() in seen else tensor
            seen.add(tensor.data_ptr())
        save_file(state, str(path))
    else:
        save_model(weights, str(path))


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: nn.Module | dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    kl_state: bytes,
    sampler_state: bytes,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    save_total_limit: int | None = None,
    reference: nn.Module | dict[str, torch.Tensor] | None = None,
) -> Path:
    """`reference` is saved too when it changes during training (TR-DPO). Weights come as modules, or
    as full state dicts where they were gathered from shards (FSDP)."""
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".{PREFIX}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_weights(model, tmp / "model.safetensors")
    if reference is not None:
        _save_weights(reference, tmp / "reference.safetensors")
    torch.save(
        {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_state()},
        tmp / "training_state.pt",
    )
    (tmp / "kl_controller.bin").write_bytes(kl_state)
    (tmp / "sampler.bin").write_bytes(sampler_state)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / _COMPLETE).write_text(json.dumps(trainer_state, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if save_total_limit:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.exists():
        return []
    found = []
    for path in output_dir.iterdir():
        match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
        if match and (path / _COMPLETE).exists():
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
    if not (path / _COMPLETE).exists():
        raise FileNotFoundError(f"{path} is not a complete epsdpo checkpoint (no {_COMPLETE})")
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    reference: nn.Module | None = None, sharded: bool = False) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG; return the rest for the trainer to apply.
    `sharded`: the models are FSDP-sharded and the checkpoint holds full state dicts."""
    training = torch.load(path / "training_state.pt", weights_only=False)
    if sharded:
        from epsdpo.sharding import load_full_state

        load_full_state(model, optimizer, load_file(str(path / "model.safetensors")), training["optimizer"])
        if reference is not None:
            load_full_state(reference, None, load_file(str(path / "reference.safetensors")), None)
    else:
        load_model(model, str(path / "model.safetensors"))
        if reference is not None:
            load_model(reference, str(path / "reference.safetensors"))
        optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    set_rng_state(training["rng"])
    return {
        "kl_state": (path / "kl_controller.bin").read_bytes(),
        "sampler_state": (path / "sampler.bin").read_bytes(),
        "trainer_state": json.loads((path / _COMPLETE).read_text()),
    }
