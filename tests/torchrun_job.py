"""Test workers run under torchrun on gloo CPU ranks, and how each rank records the end of its run.

A launch runs in a process session of its own, so that on a hang torchrun and every rank are killed
together (killing torchrun alone would leave the ranks waiting in their collectives), and the hang
fails the test instead of holding the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent


def torchrun_command(worker: str, *args: Any, nproc: int = 2) -> tuple[list[str], dict[str, str]]:
    """The command and environment that start tests/`worker` on `nproc` gloo ranks (skips the test
    where torchrun is not installed)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun is not installed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return [torchrun, "--standalone", f"--nproc_per_node={nproc}", str(HERE / worker), *map(str, args)], env


def run_torchrun(worker: str, *args: Any, timeout: float, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run the job to its end; a job still running after `timeout` seconds is killed and fails the test."""
    command, env = torchrun_command(worker, *args, nproc=nproc)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{worker} {' '.join(map(str, args))}: the ranks hung (no end within {timeout:g} s)")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def record_how_training_ends(trainer: Any, path: Path, **train_kwargs: Any) -> None:
    """Run `trainer.train(**train_kwargs)` and write to `path` how it ended on this rank: finished, or
    the exception's type and message, and the step reached (workers' results for the test to read)."""
    result: dict[str, Any] = {"rank": trainer.dist.rank}
    try:
        trainer.train(**train_kwargs)
        result["ended"] = "finished"
    except Exception as error:  # noqa: BLE001 - the test reads how each rank ended
        result.update(ended=type(error).__name__, message=str(error))
    result["step"] = trainer.state.global_step
    path.write_text(json.dumps(result))
