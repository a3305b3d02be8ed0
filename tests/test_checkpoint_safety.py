"""Checkpoints are verified before use and never executed: a flipped byte, a truncated file, an edited
step or a planted pickle payload is refused with the file named, and the payload never runs."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from epsdpo.checkpoint import MANIFEST, CheckpointError, _write_manifest
from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from tiny import tiny_llama, toy_store


def config(out, **overrides) -> TrainConfig:
    base = dict(output_dir=str(out), beta=0.1, epsilon=0.1, learning_rate=3e-3, per_device_train_batch_size=8,
                max_steps=3, warmup_ratio=0.0, lr_scheduler_type="constant", max_length=32, max_prompt_length=16,
                progress=False, plots=False, seed=3, save_steps=2, report_to="none", logging_steps=1)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    Trainer(tiny_llama(0), config(out), toy_store()).train()
    return out / "checkpoint-2"


def tampered(checkpoint, tmp_path):
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, copy)
    return copy


def resume(path, tmp_path):
    Trainer(tiny_llama(0), config(tmp_path / "resumed"), toy_store()).train(resume_from_checkpoint=path)


def test_an_untouched_checkpoint_resumes(checkpoint, tmp_path):
    resume(checkpoint, tmp_path)


@pytest.mark.parametrize("name", ["model.safetensors", "training_state.pt", "trainer_state.json",
                                  "kl_controller.bin", "sampler.bin"])
def test_one_flipped_byte_is_refused_naming_the_file(checkpoint, tmp_path, name):
    path = tampered(checkpoint, tmp_path)
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name} does not match its SHA-256"):
        resume(path, tmp_path)


def test_a_truncated_file_is_refused_naming_the_file(checkpoint, tmp_path):
    path = tampered(checkpoint, tmp_path)
    with open(path / "model.safetensors", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(CheckpointError, match="model.safetensors has 100 bytes"):
        resume(path, tmp_path)


def test_a_checkpoint_without_manifest_is_not_complete(checkpoint, tmp_path):
    path = tampered(checkpoint, tmp_path)
    (path / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="not a complete epsdpo checkpoint"):
        resume(path, tmp_path)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EPSDPO_PAYLOAD_MARK']}",))


def test_a_planted_pickle_payload_never_runs(checkpoint, tmp_path, monkeypatch):
    """The attacker rewrites the manifest too: the weights-only loader is what stops the payload."""
    mark = tmp_path / "payload-ran"
    monkeypatch.setenv("EPSDPO_PAYLOAD_MARK", str(mark))
    path = tampered(checkpoint, tmp_path)
    state = torch.load(path / "training_state.pt", weights_only=True)
    state["extra"]["planted"] = _Payload()
    torch.save(state, path / "training_state.pt")  # pickles the payload's os.system call
    _write_manifest(path)
    with pytest.raises(CheckpointError, match="training_state.pt holds something other than tensors"):
        resume(path, tmp_path)
    assert not mark.exists(), "the planted command ran"


def test_an_edited_global_step_is_refused(checkpoint, tmp_path):
    path = tampered(checkpoint, tmp_path)
    state = json.loads((path / "trainer_state.json").read_text())
    state["global_step"] = 1
    (path / "trainer_state.json").write_text(json.dumps(state))
    _write_manifest(path)  # consistent checksums: only the cross-check with the KL state can tell
    with pytest.raises(CheckpointError, match="says step 1 .* holds 2 steps"):
        resume(path, tmp_path)
