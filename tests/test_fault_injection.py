"""Crash safety under injected faults: SIGKILL at chosen points inside a checkpoint write or the final
outputs' write, a disk that fills up mid-checkpoint, SIGKILL during a preference-store save and two
threads saving one store path, and SIGTERM / SIGINT mid-step (a checkpoint of that step, then an
exact resume; a second signal ends the process at once).

The kills are deterministic: tests/fault_worker.py replaces one function the checkpoint writer calls
(safetensors' save_model, the training-state writer, the manifest writer, os.replace, shutil.rmtree)
with one that leaves its file half written, or the staging directory as it is, and SIGKILLs its own
process. A new process then resumes from the newest complete checkpoint and must retrace the
uninterrupted run exactly: every logged metric, β's history and ledger, optimizer state and weights.
Tampered checkpoint files are tests/test_checkpoint_safety.py's subject.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import select
import threading
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import epsdpo
from epsdpo.reporting import TIMINGS
from epsdpo.checkpoint import MANIFEST, list_checkpoints, resolve_checkpoint, staging_dir, verify_checkpoint

HERE = Path(__file__).resolve().parent
WORKER = HERE / "fault_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# 64 toy pairs in batches of 16: the 6 steps cross an epoch boundary; warmup + cosine make the
# scheduler state matter; ε = 0.1 moves β every step.
MAX_STEPS = 6
CONFIG = dict(beta=0.1, epsilon=0.1, learning_rate=3e-3, per_device_train_batch_size=16, max_steps=MAX_STEPS,
              warmup_ratio=0.2, lr_scheduler_type="cosine", max_length=32, max_prompt_length=16, progress=False,
              plots=False, seed=3, save_steps=2, logging_steps=1)


class ListedButIncomplete(AssertionError):
    """`list_checkpoints` (so `resume_from_checkpoint=True`) offers a checkpoint that fails verification."""


class UnnamedFileError(AssertionError):
    """A failed write did not raise an OSError naming the file."""


# --------------------------------------------------------------------------------------- workers
class Worker:
    """tests/fault_worker.py serve: each job runs in a process of its own, forked from a server that
    has imported torch and transformers but never trained."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self._stderr = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, str(WORKER), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, env=ENV, text=True)
        assert self._answer(timeout=300) == {"ready": True}

    def _answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            raise TimeoutError(f"fault worker gave no answer in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fault worker exited: {self.log.read_text()[-3000:]}")
        return json.loads(line)

    def run(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout=240)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self._stderr.close()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    server = Worker(tmp_path_factory.mktemp("worker") / "server.log")
    yield server
    server.close()


class Job:
    def __init__(self, tmp_path: Path, name: str, out: Path, fault=None, resume=None, **overrides) -> None:
        self.out = out
        self.result = tmp_path / f"{name}.json"
        self.log = tmp_path / f"{name}.log"
        self.spec = {"config": {**CONFIG, "output_dir": str(out), **overrides}, "resume": resume, "fault": fault,
                     "result": str(self.result), "log": str(self.log)}

    def run(self, worker: Worker) -> dict:
        return worker.run(self.spec)

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else "(no log)"

    def killed(self, worker: Worker) -> None:
        answer = self.run(worker)
        assert answer["signal"] == signal.SIGKILL, f"the fault did not fire: {answer}\n{self.tail()}"

    def succeeded(self, worker: Worker) -> dict:
        answer = self.run(worker)
        assert answer == {"code": 0, "signal": None}, self.tail()
        return json.loads(self.result.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in a fresh interpreter (also a check that forked jobs are no different)."""
    root = tmp_path_factory.mktemp("reference")
    job = Job(root, "reference", root / "run")
    spec = root / "job.json"
    spec.write_text(json.dumps(job.spec))
    done = subprocess.run([sys.executable, str(WORKER), "run", str(spec)], env=ENV, timeout=600,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    job.data = json.loads(job.result.read_text())
    assert [c.name for c in list_checkpoints(job.out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return job


# --------------------------------------------------------------------------------------- checks
def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMINGS} for record in history]


def assert_same_tree(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_listed_checkpoints_verify(out: Path) -> None:
    for path in list_checkpoints(out):
        try:
            verify_checkpoint(path)
        except Exception as error:  # noqa: BLE001 - any failure here is the finding
            raise ListedButIncomplete(f"{path.name} is listed as complete but: {error}") from error


def assert_same_run(job: Job, data: dict, reference: Job) -> None:
    """The run in `job.out` ended exactly where the uninterrupted one did."""
    want = reference.data
    assert data["global_step"] == want["global_step"] == MAX_STEPS
    assert without_timing(data["log_history"]) == without_timing(want["log_history"])
    assert data["beta_history"] == want["beta_history"]
    ledger, ref_ledger = np.load(job.out / "beta_ledger.npz"), np.load(reference.out / "beta_ledger.npz")
    assert sorted(ledger.files) == sorted(ref_ledger.files)
    for key in ledger.files:
        np.testing.assert_array_equal(ledger[key], ref_ledger[key], err_msg=key)
    assert_same_tree(load_file(job.out / "final" / "model.safetensors"),
                     load_file(reference.out / "final" / "model.safetensors"), "final weights")
    # the last checkpoint holds the same weights, optimizer, scheduler, RNG, KL and sampler state
    last, ref_last = job.out / f"checkpoint-{MAX_STEPS}", reference.out / f"checkpoint-{MAX_STEPS}"
    verify_checkpoint(last)
    for name in ("model.safetensors", "kl_controller.bin", "sampler.bin"):
        assert (last / name).read_bytes() == (ref_last / name).read_bytes(), name
    state, ref_state = (torch.load(p / "training_state.pt", weights_only=True) for p in (last, ref_last))
    # Python's and numpy's global RNGs are not seeded by the run (only torch's is), so their saved
    # states differ between any two processes; the loop draws from neither.
    for rng in (state["rng"], ref_state["rng"]):
        del rng["python"], rng["numpy"]
    assert_same_tree(state, ref_state, "training_state.pt")
    assert not list(job.out.glob(".checkpoint-*.tmp")), "a staging directory was left behind"
    assert_listed_checkpoints_verify(job.out)
    lines = [json.loads(line) for line in (job.out / "metrics.jsonl").read_text().splitlines()]
    assert without_timing(lines) == without_timing(want["log_history"]), "metrics.jsonl differs from the history"


def logged_steps(out: Path) -> list[int]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "train_runtime" not in r]  # not the run's closing summary


# ------------------------------------------------------------------------- SIGKILL in a checkpoint
KILLS = [
    # point, k-th checkpoint write (step 2k), complete checkpoints left, staging directory left
    ("weights", 2, [2], True),
    ("training_state", 2, [2], True),
    ("manifest", 2, [2], True),
    ("before_rename", 2, [2], True),
    ("after_rename", 2, [2, 4], False),
    ("after_rename", 3, [2, 4, 6], False),  # the resumed run has nothing left to train
]


@pytest.mark.slow
@pytest.mark.parametrize("point,k,complete,staging_left", KILLS, ids=[f"{p}-step{2 * k}" for p, k, *_ in KILLS])
def test_sigkill_inside_a_checkpoint_write_then_resume_retraces_the_run(worker, reference, tmp_path, point, k,
                                                                        complete, staging_left):
    out = tmp_path / "run"
    Job(tmp_path, "killed", out, fault={"point": point, "k": k}).killed(worker)

    names = [p.name for p in list_checkpoints(out)]
    assert names == [f"checkpoint-{step}" for step in complete]
    assert_listed_checkpoints_verify(out)
    staging = staging_dir(out, 2 * k)
    assert staging.is_dir() == staging_left
    if point == "before_rename":
        # the staging directory is complete, manifest and all, and still is not a checkpoint
        verify_checkpoint(staging)
    assert resolve_checkpoint(out, True) == out / f"checkpoint-{complete[-1]}"
    # the killed run's metrics.jsonl goes to step 2k, past the checkpoint resumed from when that is an
    # older one: the resumed run must drop those lines
    assert logged_steps(out) == list(range(1, 2 * k + 1))

    resumed = Job(tmp_path, "resumed", out, resume=True)
    assert_same_run(resumed, resumed.succeeded(worker), reference)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


@pytest.mark.slow
def test_sigkill_in_the_first_checkpoint_leaves_nothing_to_resume(worker, reference, tmp_path):
    out = tmp_path / "run"
    Job(tmp_path, "killed", out, fault={"point": "before_rename", "k": 1}).killed(worker)

    assert list_checkpoints(out) == []
    verify_checkpoint(staging_dir(out, 2))  # complete in staging, yet no checkpoint
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under"):
        resolve_checkpoint(out, True)
    refused = Job(tmp_path, "resume", out, resume=True)
    assert refused.run(worker) == {"code": 1, "signal": None}
    assert "no complete checkpoint under" in refused.tail()

    # starting over in the same directory is refused while it holds the crashed run's files ...
    refused = Job(tmp_path, "fresh", out)
    assert refused.run(worker) == {"code": 1, "signal": None}
    assert "FileExistsError" in refused.tail()
    # ... and, clearing them, retraces the uninterrupted run: nothing of the crashed run leaks in
    restarted = Job(tmp_path, "restarted", out, overwrite_output_dir=True)
    assert_same_run(restarted, restarted.succeeded(worker), reference)


@pytest.mark.slow
def test_sigkill_while_replacing_an_existing_checkpoint(worker, reference, tmp_path):
    """Resuming from an older checkpoint rewrites the newer ones; a kill while checkpoint-6 is being
    replaced must leave checkpoint-6 whole or absent."""
    out = tmp_path / "run"
    shutil.copytree(reference.out, out)
    shutil.rmtree(out / "final")
    Job(tmp_path, "killed", out, resume=str(out / "checkpoint-2"), fault={"point": "rmtree", "k": 2}).killed(worker)

    assert_listed_checkpoints_verify(out)
    resumed = Job(tmp_path, "resumed", out, resume=True)
    assert_same_run(resumed, resumed.succeeded(worker), reference)


@pytest.mark.slow
def test_sigkill_while_pruning_an_old_checkpoint(worker, reference, tmp_path):
    out = tmp_path / "run"
    Job(tmp_path, "killed", out, fault={"point": "rmtree", "k": 3}, save_total_limit=2).killed(worker)

    assert resolve_checkpoint(out, True) == out / "checkpoint-6"
    assert_listed_checkpoints_verify(out)
    resumed = Job(tmp_path, "resumed", out, resume=True, save_total_limit=2)
    assert_same_run(resumed, resumed.succeeded(worker), reference)


# ------------------------------------------------------------------------------- a full disk
PAGE = 4096
WRITE_ORDER = ("model.safetensors", "config.json", "generation_config.json", "training_state.pt", "kl_controller.bin",
               "sampler.bin", "training_config.json", "trainer_state.json", "epsdpo_state.json", MANIFEST)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 5 MiB tmpfs (needs root; skipped where mounting is not allowed)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"cannot mount a tmpfs: {error}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(mount: Path, leave_pages: int) -> Path:
    """Fill the tmpfs until `leave_pages` pages are free."""
    stat = os.statvfs(mount)
    free = stat.f_bavail * stat.f_frsize
    assert free >= leave_pages * PAGE
    filler = mount / "filler"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * (free - leave_pages * PAGE))
    stat = os.statvfs(mount)
    assert stat.f_bavail * stat.f_frsize == leave_pages * PAGE
    return filler


def pages(path: Path) -> int:
    return -(-path.stat().st_size // PAGE)


def tiny_config(out: Path, max_steps: int):
    from epsdpo.config import TrainConfig

    # report_to="none": nothing but the checkpoint is written to the disk before it fills
    return TrainConfig(**{**CONFIG, "output_dir": str(out), "max_steps": max_steps, "save_steps": 1,
                          "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "report_to": "none"})


FULL_DISK = [pytest.param(name, id=name) for name in WRITE_ORDER]


@pytest.mark.parametrize("target", FULL_DISK)
def test_a_full_disk_fails_the_checkpoint_naming_the_file_and_keeps_the_last_one(small_tmpfs, target):
    """The disk fills up while `target` of checkpoint-2 is written: the run fails with an OSError that
    names the file, checkpoint-2 does not appear, checkpoint-1 still verifies, and once there is room
    again the run resumes and writes checkpoint-2."""
    from epsdpo.trainer import Trainer
    from tiny import tiny_llama, toy_store

    out = small_tmpfs / "run"
    Trainer(tiny_llama(0), tiny_config(out, 1), toy_store()).train()
    for name in [p.name for p in (out / "final").iterdir()]:  # the final model's copy in output_dir itself
        (out / name).unlink()
    shutil.rmtree(out / "final")  # room for the test's own bookkeeping only
    first = out / "checkpoint-1"
    before = WRITE_ORDER.index(target)
    leave = sum(pages(first / name) for name in WRITE_ORDER[:before]) + pages(first / target) // 2
    leave += 1  # the run's lock file (.epsdpo.lock: a page on tmpfs), written before the checkpoint
    filler = fill(small_tmpfs, leave)

    with pytest.raises(Exception) as failed:  # noqa: PT011 - the type is checked below, after the invariants
        Trainer(tiny_llama(0), tiny_config(out, 2), toy_store()).train(resume_from_checkpoint=True)
    error = failed.value

    assert not (out / "checkpoint-2").exists()
    assert list_checkpoints(out) == [first]
    verify_checkpoint(first)
    written = staging_dir(out, 2) / target
    # the disk filled while `target` was written (a failed writer may have removed its partial file)
    left = {p.name for p in staging_dir(out, 2).iterdir()}
    assert set(WRITE_ORDER[:before]) <= left <= set(WRITE_ORDER[:before + 1]), (left, error)

    filler.unlink()
    Trainer(tiny_llama(0), tiny_config(out, 2), toy_store()).train(resume_from_checkpoint=True)
    assert list_checkpoints(out) == [first, out / "checkpoint-2"]
    verify_checkpoint(out / "checkpoint-2")
    assert not staging_dir(out, 2).exists()

    if not (isinstance(error, OSError) and str(written) in str(error)):
        raise UnnamedFileError(f"writing {written} on a full disk raised {type(error).__name__}: {error}")


def _raise(error: BaseException):
    def writer(path: Path) -> None:
        raise error
    return writer


WRITE_FAILURES = {
    # what a full filesystem or a file-size limit raises: errno and strerror must survive
    "file too large": (_raise(OSError(errno.EFBIG, "File too large")), errno.EFBIG, "File too large"),
    "disk full": (_raise(OSError(errno.ENOSPC, "No space left on device", "/elsewhere")), errno.ENOSPC,
                  "No space left on device"),
    "a real write into a missing folder": (lambda path: (path.parent / "gone" / "x").write_bytes(b"x"), errno.ENOENT,
                                           "No such file or directory"),
    # torch.save on a full disk: no errno at all, only the library's words
    "torch's iostream error": (_raise(RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")),
                               None, "RuntimeError: [enforce fail at inline_container.cc:603]"),
    "an OSError without errno": (_raise(OSError("iostream error")), None, "OSError: iostream error"),
}


@pytest.mark.parametrize("case", list(WRITE_FAILURES))
def test_a_failed_write_keeps_errno_and_strerror_and_names_the_file(tmp_path, case):
    """Before: `[Errno 27] None: '.../model.safetensors'` for a file too large, and `[Errno None] None: ...`
    for an error without errno; the reason was lost from the message."""
    from epsdpo.checkpoint import write_file

    writer, code, reason = WRITE_FAILURES[case]
    path = tmp_path / "model.safetensors"
    with pytest.raises(OSError) as failed:
        write_file(path, writer)
    error = failed.value
    assert error.errno == code and error.filename == str(path)
    assert str(path) in str(error) and reason in str(error) and "None" not in str(error), str(error)
    if code is not None:
        assert str(error) == f"[Errno {code}] {reason}: '{path}'" and error.strerror == reason
    assert isinstance(error.__cause__, BaseException)  # the library's own error stays attached


def toy_big_store(pairs: int, seed: int, length: int = 100) -> epsdpo.PreferenceStore:
    rng = np.random.default_rng(seed)
    store = epsdpo.PreferenceStore(vocab_size=1000)
    offsets = np.arange(0, pairs * length + 1, length, dtype=np.uint64)
    spans = [rng.integers(0, 1000, pairs * length, dtype=np.uint32) for _ in range(3)]
    store.append(spans[0], offsets, spans[1], offsets, spans[2], offsets)
    return store


def test_a_full_disk_never_damages_a_saved_store(small_tmpfs):
    path = small_tmpfs / "pairs.store"
    toy_big_store(50, seed=0).save(path)
    old = path.read_bytes()
    fill(small_tmpfs, 16)
    with pytest.raises(OSError) as failed:
        toy_big_store(5000, seed=1).save(path)  # about 6 MB
    assert str(path) in str(failed.value)
    assert path.read_bytes() == old
    assert len(epsdpo.PreferenceStore.load(path)) == 50
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler", "pairs.store"]  # no temporary left


# ------------------------------------------------------------------------- SIGKILL in a store save
SAVER = r"""
import sys
import epsdpo
stores = [epsdpo.PreferenceStore.load(p) for p in sys.argv[1:3]]
print("saving", flush=True)
i = 0
while True:
    stores[i % 2].save(sys.argv[3])
    i += 1
"""


def test_sigkill_during_store_save_leaves_the_old_or_the_new_store(tmp_path):
    """A process saves two stores over one path in a loop and is killed at staggered times: the path
    always holds one of the two complete files, never a mix or a torn one."""
    sources = [tmp_path / "a.store", tmp_path / "b.store"]
    toy_big_store(20000, seed=0).save(sources[0])  # about 24 MB each, tens of ms per save
    toy_big_store(16000, seed=1).save(sources[1])
    digests = {hashlib.sha256(p.read_bytes()).hexdigest(): len(epsdpo.PreferenceStore.load(p)) for p in sources}
    target_dir = tmp_path / "target"
    target_dir.mkdir()
    target = target_dir / "pairs.store"
    shutil.copyfile(sources[0], target)
    torn = 0
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, *map(str, sources), str(target)], env=ENV,
                                 stdout=subprocess.PIPE, text=True)
        assert saver.stdout.readline().strip() == "saving"
        time.sleep(delay)
        os.kill(saver.pid, signal.SIGKILL)
        assert saver.wait(timeout=30) == -signal.SIGKILL
        saver.stdout.close()
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        assert digest in digests, f"killed after {delay} s, the store file is neither the old nor the new one"
        assert len(epsdpo.PreferenceStore.load(target)) == digests[digest]
        leftovers = [p for p in target_dir.iterdir() if p != target]
        assert len(leftovers) <= 1 and all(
            re.fullmatch(rf"pairs\.store\.epsdpo-tmp{saver.pid}\.[0-9a-f]+-[0-9a-f]+", p.name) for p in leftovers
        ), [p.name for p in leftovers]
        torn += len(leftovers)
        for p in leftovers:
            p.unlink()
    # the kills did land inside saves (a temporary file was being written), so the check saw them
    assert torn >= 1


def test_two_threads_saving_one_store_path_never_tear_it(tmp_path):
    """Two threads save different stores over one path many times while a third loads it: every save
    succeeds, every load finds one of the stores whole (the valid file there before is never
    destroyed), and no temporary file is left. Saves of one process used to share one temporary
    name, so one writer truncated the file the other was about to rename into place."""
    stores = [toy_big_store(3000, seed=0), toy_big_store(2000, seed=1)]
    sizes = {len(s): s.ids().tolist() for s in stores}
    path = tmp_path / "pairs.store"
    stores[0].save(path)
    failures: list[BaseException] = []
    done = threading.Event()

    def save_many(store):
        try:
            for _ in range(40):
                store.save(path)
        except BaseException as error:  # noqa: BLE001 - collected and reported by the main thread
            failures.append(error)

    def load_until_done():
        try:
            while not done.is_set():
                loaded = epsdpo.PreferenceStore.load(path)
                assert loaded.ids().tolist() == sizes[len(loaded)]
        except BaseException as error:  # noqa: BLE001 - collected and reported by the main thread
            failures.append(error)

    reader = threading.Thread(target=load_until_done)
    reader.start()
    writers = [threading.Thread(target=save_many, args=(s,)) for s in stores]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    reader.join()
    assert not failures, failures
    loaded = epsdpo.PreferenceStore.load(path)
    assert loaded.ids().tolist() == sizes[len(loaded)]
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.store"], "a temporary file was left behind"


# ------------------------------------------------------------------ SIGKILL in the final outputs
def final_files(out: Path) -> set[str]:
    return {p.relative_to(out / "final").as_posix() for p in (out / "final").rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("point", ["final_card", "ledger", "root_model"])
def test_sigkill_while_writing_the_final_outputs_leaves_them_whole_or_absent(worker, reference, tmp_path, point):
    """Killed as final/'s model card is about to be written, with beta_ledger.npz half written, or
    with the final model's files half copied into output_dir: neither final/ without its card, nor a
    truncated ledger, nor a model from_pretrained(output_dir) finds half-written may be left (the first
    two used to be written in place); a resumed run then writes them whole."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    Job(tmp_path, "killed", out, fault={"point": point, "k": 0}).killed(worker)
    if point == "root_model":
        assert [p for p in final_files(out) if (out / p).exists()], "the kill came before any file reached output_dir"
        assert not (out / "config.json").exists(), "the model's config is in output_dir before all its files"
        with pytest.raises((OSError, ValueError)):
            AutoModelForCausalLM.from_pretrained(out)

    if (out / "final").exists():
        assert final_files(out) == final_files(reference.out), "final/ is there but incomplete"
    if (out / "beta_ledger.npz").exists():
        with np.load(out / "beta_ledger.npz") as ledger:  # every array reads back in full
            assert all(ledger[key].size >= 0 for key in ledger.files)
    assert resolve_checkpoint(out, True) == out / f"checkpoint-{MAX_STEPS}"

    resumed = Job(tmp_path, "resumed", out, resume=True)
    assert_same_run(resumed, resumed.succeeded(worker), reference)
    assert final_files(out) == final_files(reference.out)
    assert not [p.name for p in out.iterdir() if p.name.startswith((".final", ".beta_ledger"))]
    for name in final_files(out):  # and output_dir itself holds the final model, whole
        assert (out / name).read_bytes() == (out / "final" / name).read_bytes(), name
    AutoModelForCausalLM.from_pretrained(out)


# ------------------------------------------------------------------------- SIGTERM / SIGINT
STOPS = [
    # signals sent at the start of step k, exit code, checkpoints left (step k's written by the stop)
    (["SIGTERM"], 3, 128 + signal.SIGTERM, [2, 3]),
    (["SIGINT"], 3, 128 + signal.SIGINT, [2, 3]),
    (["SIGTERM"], 4, 128 + signal.SIGTERM, [2, 4]),  # a step that saves anyway: saved once
]


@pytest.mark.slow
@pytest.mark.parametrize("signals,k,code,complete", STOPS, ids=[f"{s[0]}-step{k}" for s, k, *_ in STOPS])
def test_a_stop_signal_mid_step_saves_that_step_and_resume_retraces_the_run(worker, reference, tmp_path, signals, k,
                                                                            code, complete):
    out = tmp_path / "run"
    stopped = Job(tmp_path, "stopped", out, fault={"point": "signal", "k": k, "signals": signals})
    assert stopped.run(worker) == {"code": code, "signal": None}, stopped.tail()
    assert f"stopped by {signals[0]} after step {k}; {out / f'checkpoint-{k}'} was written" in stopped.tail()
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{step}" for step in complete]
    assert_listed_checkpoints_verify(out)
    assert logged_steps(out) == list(range(1, k + 1))
    assert not (out / "final").exists() and not (out / "beta_ledger.npz").exists()
    assert not (out / ".epsdpo.lock").exists()

    resumed = Job(tmp_path, "resumed", out, resume=True)
    assert_same_run(resumed, resumed.succeeded(worker), reference)


@pytest.mark.slow
def test_a_stop_signal_without_save_steps_still_saves(worker, tmp_path):
    out = tmp_path / "run"
    stopped = Job(tmp_path, "stopped", out, fault={"point": "signal", "k": 3, "signals": ["SIGTERM"]},
                  save_steps=None)
    assert stopped.run(worker) == {"code": 128 + signal.SIGTERM, "signal": None}, stopped.tail()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    verify_checkpoint(out / "checkpoint-3")


@pytest.mark.slow
def test_a_second_stop_signal_ends_the_process_at_once(worker, reference, tmp_path):
    """Two SIGTERMs: the process dies by the second, without finishing the step or saving it; its lock
    file stays behind and the resumed run takes it over, naming the dead holder."""
    out = tmp_path / "run"
    stopped = Job(tmp_path, "stopped", out, fault={"point": "signal", "k": 3, "signals": ["SIGTERM", "SIGTERM"]})
    assert stopped.run(worker) == {"code": None, "signal": signal.SIGTERM}, stopped.tail()
    assert "second SIGTERM: stopping at once" in stopped.tail()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert logged_steps(out) == [1, 2]
    assert (out / ".epsdpo.lock").exists()

    resumed = Job(tmp_path, "resumed", out, resume=True)
    assert_same_run(resumed, resumed.succeeded(worker), reference)
    assert "was left by a run that is gone (pid" in resumed.tail()
