"""benches/gpu_check.py in its toy CPU form, so the GPU check cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_at_toy_sizes(tmp_path):
    out = tmp_path / "gpu_check.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "benches" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    page = out.read_text()
    for heading in ("## 1. Fused kernel", "## 2. Packed == padded", "## 3. bf16 mixed precision",
                    "## 4. Training side by side", "Correctness checks: all pass."):
        assert heading in page, heading
    results = json.loads(out.with_suffix(".json").read_text())
    assert {r["dtype"] for r in results["kernel"]} == {"float32", "bfloat16"}
    assert {r["layout"] for r in results["layouts"]} == {"packed", "shared_prompt"}
    assert results["master"]["ok"] and results["master"]["kept_if_bf16_stored"] < 0.2
    compared = {r["case"] for r in results["compare"][0]["results"] if "error" not in r}
    assert {"dpo_packed", "eps_packed"} <= compared
    assert str(tmp_path) not in page.split("## 4.")[1]  # no temporary paths on the page
