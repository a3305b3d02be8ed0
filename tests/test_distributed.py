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

HERE = Path(__file__).parent


def launch(out: Path, nproc: int, batch_size: int) -> dict:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [torchrun, "--standalone", f"--nproc_per_node={nproc}", str(HERE / "dist_worker.py"), str(out), str(batch_size)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    if not Path(sys.executable).with_name("torchrun").exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    single = launch(tmp_path / "single", 1, 4)
    double = launch(tmp_path / "double", 2, 2)
    assert (single["world_size"], double["world_size"]) == (1, 2)
    np.testing.assert_allclose(double["beta_history"], single["beta_history"], rtol=1e-12)
    for key in ("loss", "kl/mean_step", "rewards/margins", "rewards/accuracies", "grad_norm"):
        a = [r[key] for r in single["history"]]
        b = [r[key] for r in double["history"]]
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=key)
