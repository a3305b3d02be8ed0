"""Checkpoints are verified before use and never executed: a flipped byte, a truncated file, an edited
step or a planted pickle payload is refused with the file named, and the payload never runs. The
manifest itself is read only as a regular file of bounded size, and must list every file resume reads."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from epsdpo.checkpoint import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    CheckpointError,
    _write_manifest,
    resume_reads,
    verify_checkpoint,
)
from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from hostile_files import HOSTILE_KINDS, finishes_within, make_hostile
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
    state = json.loads((path / "epsdpo_state.json").read_text())
    state["global_step"] = 1
    (path / "epsdpo_state.json").write_text(json.dumps(state))
    _write_manifest(path)  # consistent checksums: only the cross-check with the KL state can tell
    with pytest.raises(CheckpointError, match="says step 1 .* holds 2 steps"):
        resume(path, tmp_path)


@pytest.mark.parametrize("names", [["../../etc/passwd"], ["kl_controller.bin", "kl_controller_rank1.bin"],
                                   ["sampler.bin"], [], "kl_controller.bin", 5, {"0": "kl_controller.bin"}])
def test_edited_per_rank_kl_state_files_are_refused(checkpoint, tmp_path, names):
    """Which file holds each rank's β ledger comes from epsdpo_state.json: anything but this world
    size's own names is refused, never followed to another file."""
    path = tampered(checkpoint, tmp_path)
    state = json.loads((path / "epsdpo_state.json").read_text())
    assert state["kl_state_files"] == ["kl_controller.bin"]
    state["kl_state_files"] = names
    (path / "epsdpo_state.json").write_text(json.dumps(state))
    _write_manifest(path)  # consistent checksums: only reading the names can tell
    with pytest.raises(CheckpointError, match="kl_state_files is .*, not the 1 per-rank files"):
        resume(path, tmp_path)


def test_a_checkpoint_from_before_per_rank_kl_state_resumes(checkpoint, tmp_path, recwarn):
    path = tampered(checkpoint, tmp_path)
    state = json.loads((path / "epsdpo_state.json").read_text())
    del state["kl_state_files"]
    (path / "epsdpo_state.json").write_text(json.dumps(state))
    _write_manifest(path)
    resume(path, tmp_path)
    assert not [w for w in recwarn if "KL controller only" in str(w.message)]  # one process: nothing is missing


# --------------------------------------------------------------------------------------------
# The manifest itself: a regular file of bounded size that lists every file resume reads
# --------------------------------------------------------------------------------------------


def rewrite_manifest(path, edit) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest["files"])
    (path / MANIFEST).write_text(json.dumps(manifest))


def resume_within(path, tmp_path, fifo=None):
    """Resume, failing the test (not hanging the suite) if it blocks on a file."""
    finishes_within(60, lambda: resume(path, tmp_path), fifo=fifo)


@pytest.mark.parametrize("kind", list(HOSTILE_KINDS))
def test_a_manifest_that_is_not_a_regular_file_is_refused_unread(checkpoint, tmp_path, kind):
    """Before: a FIFO blocked resume forever, a link to /dev/zero read until memory ran out."""
    path = tampered(checkpoint, tmp_path)
    reason = make_hostile(kind, path / MANIFEST)
    with pytest.raises(CheckpointError, match=re.escape(f"{MANIFEST} {reason}, so it is not read")):
        resume_within(path, tmp_path, fifo=path / MANIFEST if kind == "fifo" else None)


@pytest.mark.parametrize("kind", list(HOSTILE_KINDS))
def test_a_listed_file_that_is_not_a_regular_file_is_refused_unread(checkpoint, tmp_path, kind):
    """The manifest lists sampler.bin, but a FIFO (or a device, or a folder) stands there: the hash
    would block or never end."""
    path = tampered(checkpoint, tmp_path)
    reason = make_hostile(kind, path / "sampler.bin")
    with pytest.raises(CheckpointError, match=re.escape(f"sampler.bin is listed in {MANIFEST}, but: {reason}")):
        resume_within(path, tmp_path, fifo=path / "sampler.bin" if kind == "fifo" else None)


def test_an_oversize_manifest_is_refused_unread(checkpoint, tmp_path):
    path = tampered(checkpoint, tmp_path)
    with open(path / MANIFEST, "a") as handle:
        handle.write(" " * MAX_MANIFEST_BYTES)  # still valid JSON, but too large to be read
    with pytest.raises(CheckpointError, match=re.escape(f"{MANIFEST} is over {MAX_MANIFEST_BYTES:,} bytes")):
        resume(path, tmp_path)


def test_an_empty_manifest_verifies_nothing_and_is_refused(checkpoint, tmp_path):
    """Before: {"files": {}} passed verification, and every file was then loaded unchecked."""
    path = tampered(checkpoint, tmp_path)
    (path / MANIFEST).write_text('{"format": 1, "files": {}}')
    with pytest.raises(CheckpointError, match=r"does not list model.safetensors, training_state.pt, kl_controller.bin, "
                                              r"sampler.bin, trainer_state.json and 1 more, which resuming reads"):
        resume(path, tmp_path)


@pytest.mark.parametrize("name", resume_reads(Path("no-such-checkpoint")))
def test_a_manifest_omitting_a_file_resume_reads_is_refused(checkpoint, tmp_path, name):
    path = tampered(checkpoint, tmp_path)
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # altered, and the manifest no longer mentions it
    (path / name).write_bytes(bytes(data))
    rewrite_manifest(path, lambda files: files.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(f"{MANIFEST} does not list {name}, which resuming reads")):
        resume(path, tmp_path)


def test_a_moving_reference_must_be_listed_too(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_llama(0), config(out, method="tr_dpo", ref_model_sync_steps=1), toy_store()).train()
    path = out / "checkpoint-2"
    assert "reference.safetensors" in resume_reads(path, reference=True)
    rewrite_manifest(path, lambda files: files.pop("reference.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(f"does not list reference.safetensors, which resuming reads")):
        Trainer(tiny_llama(0), config(tmp_path / "resumed", method="tr_dpo", ref_model_sync_steps=1),
                toy_store()).train(resume_from_checkpoint=path)


@pytest.mark.parametrize("entry, message", [
    (("../../etc/passwd", {"size": 1, "sha256": "0"}), "lists '../../etc/passwd', which is not a file inside"),
    (("/etc/passwd", {"size": 1, "sha256": "0"}), "lists '/etc/passwd', which is not a file inside"),
    (("sampler.bin", {"size": "12", "sha256": "0"}), "the entry of 'sampler.bin' is not {size: an integer"),
    (("sampler.bin", ["size", 12]), "the entry of 'sampler.bin' is not {size: an integer"),
], ids=["parent", "absolute", "size a string", "entry a list"])
def test_a_malformed_manifest_entry_is_refused_by_name(checkpoint, tmp_path, entry, message):
    path = tampered(checkpoint, tmp_path)
    rewrite_manifest(path, lambda files: files.update([entry]))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        resume(path, tmp_path)


@pytest.mark.parametrize("text", ["[1, 2]", '{"files": [1]}', "not json", "[" * 100_000 + "]" * 100_000, "\xff"])
def test_an_unreadable_manifest_is_a_checkpoint_error(checkpoint, tmp_path, text):
    path = tampered(checkpoint, tmp_path)
    (path / MANIFEST).write_bytes(text.encode("latin-1") if text == "\xff" else text.encode())
    with pytest.raises(CheckpointError, match=re.escape(f"{MANIFEST} is unreadable")):
        resume(path, tmp_path)


def test_a_file_the_manifest_does_not_list_is_ignored(checkpoint, tmp_path):
    """Resume never reads it, so it needs no checksum (a note a user left, say)."""
    path = tampered(checkpoint, tmp_path)
    (path / "NOTES.txt").write_text("tried lr 3e-3")
    resume(path, tmp_path)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "[1, 2]", "not json"])
def test_an_unreadable_trainer_state_with_recomputed_checksums_is_a_checkpoint_error(checkpoint, tmp_path, text):
    path = tampered(checkpoint, tmp_path)
    (path / "trainer_state.json").write_text(text)
    _write_manifest(path)  # the checksums agree: only reading it can tell
    with pytest.raises(CheckpointError, match=re.escape("trainer_state.json is unreadable")):
        resume(path, tmp_path)


def test_a_sharded_checkpoint_must_list_every_shard(tmp_path):
    """DCP reads whatever its (pickled) metadata names under sharded/: every file there is read."""
    path = tmp_path / "checkpoint-4"
    (path / "sharded").mkdir(parents=True)
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
        (path / "sharded" / name).write_bytes(b"x")
    assert resume_reads(path) == ["sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp",
                                  "training_state.pt", "kl_controller.bin", "sampler.bin", "trainer_state.json",
                                  "training_config.json"]
    for name in resume_reads(path):
        (path / name).write_bytes(b"x")
    _write_manifest(path)
    rewrite_manifest(path, lambda files: files.pop("sharded/__1_0.distcp"))
    with pytest.raises(CheckpointError, match=re.escape("does not list sharded/__1_0.distcp, which resuming reads")):
        verify_checkpoint(path)


# --------------------------------------------------------------------------------------------
# Per-rank RNG state: each rank restores its own; a checkpoint from before restores rank 0's
# --------------------------------------------------------------------------------------------


def rewrite_training_state(path, edit) -> None:
    state = torch.load(path / "training_state.pt", weights_only=True)
    edit(state)
    torch.save(state, path / "training_state.pt")
    _write_manifest(path)  # consistent checksums: what is read is the edited content


def restored_rng(path, tmp_path, monkeypatch) -> dict:
    import epsdpo.checkpoint

    restored = []
    real = epsdpo.checkpoint.set_rng_state
    monkeypatch.setattr(epsdpo.checkpoint, "set_rng_state", lambda state: (restored.append(state), real(state)))
    resume(path, tmp_path)
    return restored[0]


def test_each_rank_restores_its_own_rng_state_and_an_older_checkpoint_rank_0s(checkpoint, tmp_path, monkeypatch):
    saved = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert len(saved["rng_per_rank"]) == 1
    assert torch.equal(restored_rng(checkpoint, tmp_path, monkeypatch)["torch"], saved["rng_per_rank"][0]["torch"])
    # written before per-rank states: the one state it holds is restored (on every rank)
    path = tampered(checkpoint, tmp_path)
    rewrite_training_state(path, lambda state: state.pop("rng_per_rank"))
    assert torch.equal(restored_rng(path, tmp_path / "old", monkeypatch)["torch"], saved["rng"]["torch"])


@pytest.mark.parametrize("per_rank", [[], "not a list"])
def test_a_checkpoint_without_this_ranks_rng_state_is_refused(checkpoint, tmp_path, per_rank):
    path = tampered(checkpoint, tmp_path)
    rewrite_training_state(path, lambda state: state.update(rng_per_rank=per_rank))
    with pytest.raises(CheckpointError, match=r"training_state.pt holds .* per-rank RNG states, so rank 0 has none"):
        resume(path, tmp_path)
