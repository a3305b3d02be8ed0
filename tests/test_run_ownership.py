"""A run owns its output: a second run in a held output_dir is refused naming the holder (a dead
holder's lock is taken over and named), final/ and beta_ledger.npz appear whole or not at all, and
SIGTERM through `epsdpo train` ends the run with a checkpoint of its last step and exit code 143.

Kills at chosen points of the final write and signals with exact resumes are in
tests/test_fault_injection.py (they share its worker and its uninterrupted reference run).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from epsdpo.checkpoint import list_checkpoints, previous_run_outputs, verify_checkpoint
from epsdpo.config import TrainConfig
from epsdpo.interrupt import TrainingInterrupted
from epsdpo.run_lock import LOCK_FILE, OutputDirBusyError
from epsdpo.trainer import Trainer
from tiny import tiny_llama, toy_store

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}


def config(out: Path, **overrides) -> TrainConfig:
    base = dict(output_dir=str(out), beta=0.1, epsilon=0.1, learning_rate=3e-3, per_device_train_batch_size=8,
                max_steps=3, warmup_ratio=0.0, lr_scheduler_type="constant", max_length=32, max_prompt_length=16,
                progress=False, plots=False, seed=3, logging_steps=1)
    return TrainConfig(**{**base, **overrides})


def steps_logged(out: Path) -> list[int]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "train_runtime" not in r]  # not the run's closing summary


# ---------------------------------------------------------------------------- item 7: the lock
# Another process that holds the lock as a run does (flock on the lock file, its pid and host in it:
# plain fcntl, so that it starts without importing torch), then ends without removing the file, as a
# killed run would, once the test closes its stdin.
HOLDER = r"""
import fcntl, os, socket, sys
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], sys.argv[2]), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"pid {os.getpid()} host {socket.gethostname()}\n".encode())
print("held", flush=True)
sys.stdin.read()
"""


def test_a_second_run_is_refused_while_another_holds_the_output_dir_and_a_dead_holder_is_named(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), LOCK_FILE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=ENV, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        named = rf"in use by another run \(pid {holder.pid} on host {re.escape(socket.gethostname())}, lock file "
        for resume in (None, True):  # a fresh run and a resumed one alike
            with pytest.raises(OutputDirBusyError, match=named):
                Trainer(tiny_llama(0), config(out), toy_store()).train(resume_from_checkpoint=resume)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE], "a refused run wrote into the output_dir"
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        holder.stdout.close()
    # the holder is gone, its lock file is not: neither another run's output nor a lock any more
    assert (out / LOCK_FILE).read_text().startswith(f"pid {holder.pid} host ")
    assert previous_run_outputs(out) == []
    with pytest.warns(UserWarning, match=rf"left by a run that is gone \(pid {holder.pid} on host "):
        Trainer(tiny_llama(0), config(out), toy_store()).train()
    assert steps_logged(out) == [1, 2, 3]
    assert not (out / LOCK_FILE).exists(), "the run did not remove its lock file when it ended"


def test_a_run_that_fails_releases_the_output_dir(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        Trainer(tiny_llama(0), config(out), toy_store()).train(resume_from_checkpoint=True)
    assert not (out / LOCK_FILE).exists()
    Trainer(tiny_llama(0), config(out), toy_store()).train()  # in this process too: the lock was let go
    assert steps_logged(out) == [1, 2, 3]


def test_train_restores_the_signal_handlers_and_keeps_an_ignored_signal_ignored(tmp_path):
    def mine(signum, frame):
        raise AssertionError("not expected to run")

    previous = signal.signal(signal.SIGTERM, mine), signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        Trainer(tiny_llama(0), config(tmp_path / "a"), toy_store()).train()
        with pytest.raises(FileNotFoundError):
            Trainer(tiny_llama(0), config(tmp_path / "b"), toy_store()).train(resume_from_checkpoint=True)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == (mine, signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def signals_at_step(monkeypatch, step: int, *signums: int) -> None:
    """Send this process `signums` (real signals) as optimizer step `step` starts."""
    real = Trainer._train_step

    def train_step(self, batches):
        if self.state.global_step + 1 == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return real(self, batches)

    monkeypatch.setattr(Trainer, "_train_step", train_step)


def test_sigint_in_process_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    signals_at_step(monkeypatch, 2, signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGINT after step 2; .*checkpoint-2 was written") as e:
        Trainer(tiny_llama(0), config(out, max_steps=5), toy_store()).train()
    assert (e.value.exit_code, e.value.step, e.value.checkpoint) == (130, 2, out / "checkpoint-2")
    assert list_checkpoints(out) == [out / "checkpoint-2"]
    verify_checkpoint(out / "checkpoint-2")
    assert steps_logged(out) == [1, 2]
    assert not (out / LOCK_FILE).exists()


def test_a_second_sigint_raises_keyboard_interrupt_at_once(tmp_path, monkeypatch):
    """The second Ctrl-C gets Python's own KeyboardInterrupt (a notebook's kernel is interrupted, not
    killed): the step in progress is neither finished nor saved, and the output_dir is let go."""
    out = tmp_path / "run"
    signals_at_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_llama(0), config(out, max_steps=5), toy_store()).train()
    assert list_checkpoints(out) == []
    assert steps_logged(out) == [1]
    assert not (out / LOCK_FILE).exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------- item 9: whole or absent
def test_a_failed_final_write_leaves_the_earlier_final_whole(tmp_path, monkeypatch):
    """Writing final/'s model card fails: the final/ of the run before is still there, whole, and
    no half-written final/ takes its place (final/ used to be written in place, card last)."""
    import epsdpo.model_card as model_card

    out = tmp_path / "run"
    Trainer(tiny_llama(0), config(out, save_steps=3), toy_store()).train()
    before = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    assert "README.md" in before and "model.safetensors" in before

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_card, "write_model_card", disk_full)
    with pytest.raises(OSError, match=re.escape(str(out / "final"))):
        Trainer(tiny_llama(1), config(out, max_steps=4, save_steps=3), toy_store()).train(resume_from_checkpoint=True)
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [], "a staging leftover remains"
    monkeypatch.undo()
    # the next complete write replaces it
    Trainer(tiny_llama(1), config(out, max_steps=4, save_steps=3), toy_store()).train(resume_from_checkpoint=True)
    assert (out / "final" / "README.md").read_text() != before["README.md"].decode()
    assert not [p for p in out.iterdir() if p.name.startswith(".final")]


def test_a_failed_ledger_write_keeps_the_earlier_ledger(tmp_path, monkeypatch):
    out = tmp_path / "run"
    Trainer(tiny_llama(0), config(out, save_steps=3), toy_store()).train()
    before = (out / "beta_ledger.npz").read_bytes()
    real_savez = np.savez

    def savez_then_fail(file, *args, **kwargs):
        real_savez(file, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", savez_then_fail)
    with pytest.raises(OSError, match=re.escape(str(out / "beta_ledger.npz"))):
        Trainer(tiny_llama(0), config(out, max_steps=4, save_steps=3), toy_store()).train(resume_from_checkpoint=True)
    assert (out / "beta_ledger.npz").read_bytes() == before
    assert [p.name for p in out.iterdir() if "ledger" in p.name] == ["beta_ledger.npz"]


# ------------------------------------------------------------- item 10: SIGTERM through the CLI
@pytest.mark.slow
def test_sigterm_to_epsdpo_train_saves_the_step_and_exits_143(tmp_path):
    """A real SIGTERM from outside, mid-run, to the `epsdpo train` process: it finishes the step, saves
    checkpoint-N (no save_steps set: the run would otherwise save nothing), prints one line naming it
    and how to resume, and exits 143; `--resume` then finishes the run."""
    tiny_llama().save_pretrained(tmp_path / "model")
    toy_store(64).save(tmp_path / "train.store")
    out = tmp_path / "out"
    (tmp_path / "run.yaml").write_text(
        f"model: {tmp_path / 'model'}\ntrain_data: {tmp_path / 'train.store'}\noutput_dir: {out}\n"
        "max_steps: 120\nper_device_train_batch_size: 4\nmax_length: 32\nmax_prompt_length: 16\nprogress: false\n"
        "plots: false\nlearning_rate: 1e-3\nlogging_steps: 1\nseed: 3\n"
    )
    command = [sys.executable, "-m", "epsdpo", "train", str(tmp_path / "run.yaml")]
    run = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
        time.sleep(0.005)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=240)
    assert run.returncode == 128 + signal.SIGTERM, err[-3000:]

    [checkpoint] = list_checkpoints(out)
    step = int(checkpoint.name.removeprefix("checkpoint-"))
    assert 3 <= step < 120
    verify_checkpoint(checkpoint)
    assert steps_logged(out) == list(range(1, step + 1))
    assert not (out / "final").exists() and not (out / LOCK_FILE).exists()
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"epsdpo train: stopped by SIGTERM after step {step}; {checkpoint} was written"), err
    assert "--resume" in last and "Traceback" not in err

    done = subprocess.run([*command, "--resume"], env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert steps_logged(out) == list(range(1, 121))
    assert (out / "final" / "README.md").exists()
