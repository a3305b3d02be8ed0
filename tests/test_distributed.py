"""Two gloo processes with half the batch each train exactly like one process with the whole batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torchrun_job import run_torchrun, torchrun_command

HERE = Path(__file__).parent


def launch(out: Path, nproc: int, batch_size: int, *args: str, fails: bool = False) -> dict | str:
    """The run's result; with `fails`, its stderr (the run must fail)."""
    done = run_torchrun("dist_worker.py", out, batch_size, *args, nproc=nproc, timeout=600)
    if fails:
        assert done.returncode != 0
        return done.stderr
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


KEYS = ("loss", "kl/mean_step", "rewards/margins", "rewards/accuracies", "grad_norm")


def assert_same_run(got: dict, want: dict) -> None:
    np.testing.assert_allclose(got["beta_history"], want["beta_history"], rtol=1e-12)
    for key in (*KEYS, "eval_loss", "eval_rewards/margins"):
        a = [r[key] for r in want["history"] if key in r]
        b = [r[key] for r in got["history"] if key in r]
        assert a, key
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=key)


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    if not Path(sys.executable).with_name("torchrun").exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    out = tmp_path_factory.mktemp("single")
    return out, launch(out, 1, 4)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path, single):
    double = launch(tmp_path / "double", 2, 2)
    assert (single[1]["world_size"], double["world_size"]) == (1, 2)
    assert_same_run(double, single[1])


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes(tmp_path, single):
    import torch

    sharded = launch(tmp_path / "fsdp", 2, 2, "fsdp")
    assert sharded["sharded"] and sharded["world_size"] == 2
    assert_same_run(sharded, single[1])
    # The saved model is gathered whole, and equals the unsharded run's
    want, got = final_weights(single[0]), final_weights(tmp_path / "fsdp")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    # Checkpoints are sharded: each rank wrote its own part, nobody gathered the whole model
    checkpoint = tmp_path / "fsdp" / "checkpoint-2"
    assert (checkpoint / "sharded" / ".metadata").is_file() and not (checkpoint / "model.safetensors").exists()
    assert len(list((checkpoint / "sharded").glob("*.distcp"))) == 2
    # A sharded run resumed from its step-2 checkpoint continues exactly
    resumed = launch(tmp_path / "fsdp", 2, 2, "fsdp", "resume")
    assert_same_run(resumed, sharded)
    # Another world size would change the data order: refused, naming both sizes
    error = launch(tmp_path / "fsdp", 1, 4, "fsdp", "resume", fails=True)
    assert "written by a run of 2 rank(s), this run has 1" in error
    # A sharded checkpoint resumes only into a sharded run
    error = launch(tmp_path / "fsdp", 2, 2, "ddp", "resume", fails=True)
    assert "was written by a run with FSDP and this run is without it" in error


@pytest.mark.slow
def test_fsdp_moves_a_sharded_tr_dpo_reference_like_one_process(tmp_path, single):
    """TR-DPO's soft update runs shard by shard; its reference is gathered into checkpoints."""
    one = launch(tmp_path / "one", 1, 4, "ddp", "fresh", "tr_dpo")
    sharded = launch(tmp_path / "fsdp", 2, 2, "fsdp", "fresh", "tr_dpo")
    assert_same_run(sharded, one)
    assert (tmp_path / "fsdp" / "checkpoint-2" / "sharded" / ".metadata").is_file()
    resumed = launch(tmp_path / "fsdp", 2, 2, "fsdp", "resume", "tr_dpo")
    assert_same_run(resumed, sharded)
    # TR-DPO is DPO until its reference first moves (after step τ = 2), then it leaves it
    dpo = launch(tmp_path / "dpo", 1, 4, "ddp", "fresh", "dpo")
    tr_losses, dpo_losses = ([r["loss"] for r in run["history"] if "loss" in r] for run in (one, dpo))
    assert tr_losses[:2] == dpo_losses[:2] and abs(tr_losses[2] - dpo_losses[2]) > 1e-6


def launch_stop(out: Path, signal_rank: int) -> list[dict]:
    """tests/dist_stop_worker.py on 2 gloo ranks; how each rank's train() ended. A hang is a failure."""
    done = run_torchrun("dist_stop_worker.py", out, signal_rank, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_a_sigterm_reaching_one_rank_stops_every_rank_at_one_checkpoint(tmp_path):
    from epsdpo.checkpoint import list_checkpoints, verify_checkpoint

    out = tmp_path / "run"
    ranks = launch_stop(out, signal_rank=1)
    assert [(r["ended"], r["step"]) for r in ranks] == [("TrainingInterrupted", 2)] * 2, ranks
    assert "stopped by SIGTERM after step 2" in ranks[0]["message"]
    assert list_checkpoints(out) == [out / "checkpoint-2"]
    verify_checkpoint(out / "checkpoint-2")
    assert not (out / "final").exists()


@pytest.mark.slow
def test_a_held_output_dir_stops_every_rank_without_a_hang(tmp_path):
    from epsdpo.run_lock import RunLock

    out = tmp_path / "run"
    held = RunLock(out)
    held.acquire()
    try:
        ranks = launch_stop(out, signal_rank=-1)
    finally:
        held.release()
    assert [r["ended"] for r in ranks] == ["OutputDirBusyError"] * 2, ranks
    assert f"in use by another run (pid {os.getpid()} on host" in ranks[0]["message"]
    assert "rank 0 could not lock output_dir" in ranks[1]["message"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["rank0.json", "rank1.json"])


@pytest.mark.slow
def test_a_resumed_run_with_dropout_continues_every_ranks_random_draws(tmp_path):
    """With dropout on, each rank draws its own masks from its own generators: a checkpoint holds
    every rank's RNG state and each rank resumes its own, so the resumed run continues exactly (with
    rank 0's state restored on every rank, rank 1's masks after the checkpoint were other ones)."""
    import torch

    out = tmp_path / "run"
    whole = launch(out, 2, 2, "ddp", "fresh", "epsilon_dpo", "dropout")
    want = {name: tensor.clone() for name, tensor in final_weights(out).items()}
    resumed = launch(out, 2, 2, "ddp", "resume", "epsilon_dpo", "dropout")
    assert_same_run(resumed, whole)
    got = final_weights(out)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    # The ranks' generators did differ: the test would not see rank 0's state restored everywhere otherwise
    saved = torch.load(out / "checkpoint-2" / "training_state.pt", weights_only=True)
    ranks = saved["rng_per_rank"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


def launch_layout(base: Path, probe: str) -> list[dict]:
    """tests/dist_layout_worker.py on 2 gloo ranks, each with its own output_dir under the same
    relative name (node-local disks); how each rank's train() ended. A hang is a failure."""
    done = run_torchrun("dist_layout_worker.py", base, probe, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((base / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_fsdp_on_node_local_output_dirs_stops_before_the_first_step(tmp_path):
    """FSDP ranks write their own shards into output_dir: on node-local disks every checkpoint would
    lack the other nodes' shards, so the run stops on every rank before training, naming the layout."""
    from epsdpo.checkpoint import list_checkpoints

    ranks = launch_layout(tmp_path, "probe")
    assert [(r["ended"], r["step"]) for r in ranks] == [("OutputDirNotSharedError", 0)] * 2, ranks
    assert "output_dir run is not one folder shared by every rank: rank(s) 1 do not see" in ranks[0]["message"]
    assert ranks[0]["message"] == ranks[1]["message"]
    for node in ("node0", "node1"):
        assert list_checkpoints(tmp_path / node / "run") == []
    assert not list((tmp_path / "node0" / "run").glob(".epsdpo-storage-probe-*"))  # the probe is removed


@pytest.mark.slow
def test_a_sharded_checkpoint_lacking_a_ranks_shards_is_never_finished(tmp_path):
    """Past the start-up check (storage that stops being shared mid-run): rank 0 gathers the files
    every rank wrote and finds rank 1's shard missing from its output_dir, so no manifest is written
    and every rank stops at that step, instead of a checkpoint that verifies and cannot be resumed."""
    from epsdpo.checkpoint import MANIFEST, list_checkpoints

    ranks = launch_layout(tmp_path, "no-probe")
    assert [(r["ended"], r["step"]) for r in ranks] == [("OutputDirNotSharedError", 2)] * 2, ranks
    assert ".checkpoint-2.tmp: rank 1 wrote sharded/__1_0.distcp, which rank 0 does not see" in ranks[0]["message"]
    assert "rank 0 does not see every rank's shards" in ranks[1]["message"]
    for node in ("node0", "node1"):
        assert list_checkpoints(tmp_path / node / "run") == []
        assert not list((tmp_path / node / "run").rglob(MANIFEST))


def _end_workers(out: Path) -> None:
    """The ranks that outlived the test, the stopped one included: continued and killed, so that a
    failure leaves no process behind (torchrun starts its workers in sessions of their own)."""
    import signal

    for pid_file in out.glob("pid*"):
        pid = int(pid_file.read_text())
        try:  # a pid the system has since given to another process is left alone
            if b"dist_freeze_worker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
        except OSError:
            continue
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break


@pytest.mark.slow
def test_a_frozen_peer_ends_the_job_after_ddp_timeout(tmp_path):
    """Rank 1 stops (SIGSTOP) mid-run without dying. Rank 0 waits in its collective for ddp_timeout, not
    torch's 30 minutes, and fails; torchrun then takes the stopped rank down (SIGTERM, which a stopped
    process holds, then SIGKILL after its shutdown grace of 30 s), and the job ends non-zero."""
    import signal
    import time

    out, ddp_timeout = tmp_path / "run", 5
    command, env = torchrun_command("dist_freeze_worker.py", out, ddp_timeout)
    log = tmp_path / "torchrun.log"  # a file, not a pipe: a leftover worker holding a pipe would block reading it
    with open(log, "w") as sink:
        job = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # before the fix the job holds for torch's 1800 s: a hang here is the failure this test catches
            job.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            pytest.fail(f"a rank stopped with SIGSTOP held the job past 120 s although ddp_timeout={ddp_timeout}")
        finally:
            _end_workers(out)
    stderr = log.read_text()
    ended = time.time()
    assert job.returncode != 0, stderr[-3000:]
    frozen, rank0 = (json.loads((out / name).read_text()) for name in ("frozen.json", "rank0.json"))
    # rank 0 gave up on its peer after ddp_timeout (not at once, not after torch's default) ...
    assert rank0["ended"] == "PeerTimeoutError" and rank0["step"] == 1, rank0
    assert f"rank 0 waited ddp_timeout={ddp_timeout} s after step 1 for another rank" in rank0["message"], rank0
    waited = rank0["time"] - frozen["time"]
    assert ddp_timeout - 1 <= waited <= ddp_timeout + 20, (waited, rank0)
    # ... and the whole job, the stopped rank included, ended within torchrun's shutdown grace after that
    assert ended - rank0["time"] <= 60, stderr[-3000:]


def launch_ledger(out: Path, mode: str) -> str:
    """tests/dist_ledger_worker.py on 2 gloo ranks (fresh, or resumed from checkpoint-2); its stderr."""
    done = run_torchrun("dist_ledger_worker.py", out, mode, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def read_ledger(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "beta_ledger.npz") as ledger:
        return {name: ledger[name] for name in ledger.files}


@pytest.mark.slow
def test_the_beta_ledger_books_every_ranks_pairs_once_and_resumes_per_rank(tmp_path):
    from collections import Counter

    from epsdpo.checkpoint import verify_checkpoint

    out = tmp_path / "run"
    launch_ledger(out, "fresh")
    ledger = read_ledger(out)
    # what each rank was given to train, step by step, recorded outside the ledger
    trained = {rank: json.loads((out / f"trained{rank}_fresh.json").read_text()) for rank in (0, 1)}
    assert [len(steps) for steps in trained.values()] == [4, 4] and all(len(s) == 2 for s in trained[1])
    booked = Counter()
    for rank, steps in trained.items():
        booked.update((pair, rank) for step in steps for pair in step)
    # every pair-step of every rank booked once (2 ranks x 2 pairs x 4 steps), every pair of the 8 present
    counts = ledger["plus"] + ledger["zero"] + ledger["minus"]
    assert int(counts.sum()) == 16 and set(ledger["pair_ids"].tolist()) == set(range(8)), counts
    # one row per (pair, rank that trained it), sorted, with as many steps as that rank trained it
    rows = list(zip(ledger["pair_ids"].tolist(), ledger["rank"].tolist()))
    assert rows == sorted(booked), (rows, sorted(booked))
    assert dict(zip(rows, counts.tolist())) == dict(booked)
    assert {"beta_history", "last_step", "last_beta"} <= ledger.keys() and len(ledger["beta_history"]) == 5
    # the checkpoint keeps each rank's controller, listed in its manifest
    checkpoint = out / "checkpoint-2"
    verify_checkpoint(checkpoint)
    assert json.loads((checkpoint / "epsdpo_state.json").read_text())["kl_state_files"] == [
        "kl_controller.bin", "kl_controller_rank1.bin"]
    # resumed at step 2, each rank continues its own ledger: the run's ledger is the uninterrupted one's
    launch_ledger(out, "resume")
    resumed = read_ledger(out)
    assert resumed.keys() == ledger.keys()
    for name in ledger:
        np.testing.assert_array_equal(resumed[name], ledger[name], err_msg=name)
    # a checkpoint written before every rank's controller was kept still resumes, every rank from rank 0's, and says so
    from epsdpo.checkpoint import _write_manifest

    state = json.loads((checkpoint / "epsdpo_state.json").read_text())
    del state["kl_state_files"]
    (checkpoint / "epsdpo_state.json").write_text(json.dumps(state))
    (checkpoint / "kl_controller_rank1.bin").unlink()
    _write_manifest(checkpoint)
    assert "holds rank 0's KL controller only" in launch_ledger(out, "resume")


class _ProcessGroupSpy:
    """Stands in for torch's process-group calls in one process: records, in order, which device was
    selected and how the group was formed."""

    def __init__(self, monkeypatch, cuda: bool) -> None:
        import atexit

        import torch
        import torch.distributed as dist

        self.calls: list[tuple] = []
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: self.calls.append(("set_device", device)))
        monkeypatch.setattr(dist, "is_initialized", lambda: False)
        monkeypatch.setattr(dist, "init_process_group",
                            lambda *args, **kwargs: self.calls.append(("init_process_group", args, kwargs)))
        monkeypatch.setattr(dist, "get_rank", lambda: 1)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(atexit, "register", lambda *args: None)  # nothing to leave: no group was formed


def test_a_cuda_rank_selects_its_gpu_before_forming_the_nccl_group_and_names_it(monkeypatch):
    from datetime import timedelta

    import torch

    from epsdpo.distributed import init_from_env

    spy = _ProcessGroupSpy(monkeypatch, cuda=True)
    info = init_from_env(timeout_s=42)
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    assert spy.calls == [
        ("set_device", 1),
        ("init_process_group", ("nccl",), {"timeout": timedelta(seconds=42), "device_id": torch.device("cuda", 1)}),
    ]


def test_a_cpu_rank_forms_a_gloo_group_without_a_device(monkeypatch):
    from datetime import timedelta

    from epsdpo.distributed import init_from_env

    spy = _ProcessGroupSpy(monkeypatch, cuda=False)
    init_from_env(timeout_s=42)
    assert spy.calls == [("init_process_group", ("gloo",), {"timeout": timedelta(seconds=42)})]
