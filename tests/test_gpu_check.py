"""benches/gpu_check.py: its toy CPU form (so the GPU check cannot rot between GPU runs), and the
properties that let the one GPU run we get measure instead of losing its results: every section
lands on the page as it ends, a raising check is recorded and the rest run, the deadline stops the
run in time, subprocesses are killed whole, and a row naming a kernel fails when that kernel did not
run (the varlen rows once ran the per-segment loop and reported pass)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benches" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["gpu_check"]


def _cpu_env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_at_toy_sizes(tmp_path):
    out = tmp_path / "gpu_check.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, env=_cpu_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    page = out.read_text()
    for heading in ("## 0. Preflight", "## 1. Fused kernel", "## 2. Packed == padded", "## 3. Which attention path",
                    "## 4. bf16 mixed precision", "## 5. Training side by side", "Checks: none failed. Every section ran."):
        assert heading in page, heading
    sections = json.loads(out.with_suffix(".json").read_text())["sections"]
    assert all(record["status"] == "done" for record in sections.values()), sections
    assert " min in all, " in page
    assert {r["dtype"] for r in sections["kernel"]["result"]["rows"]} == {"float32", "bfloat16"}
    layouts = sections["layouts"]["result"]["rows"]
    assert {r["layout"] for r in layouts if r.get("ok")} == {"packed", "shared_prompt"}
    # kernels a CPU cannot run are recorded as not run, with the reason, never as passing
    for row in layouts + sections["training_path"]["result"]["rows"]:
        if row["expects"] is not None:
            assert "ok" not in row and "CUDA only" in row["not_run"], row
    assert "pass" not in [line.rsplit("|", 2)[-2].strip() for line in page.splitlines() if "| torch varlen_attn" in line]
    assert sections["master"]["result"]["rows"][0]["kept_if_bf16_stored"] < 0.2
    compared = {r["case"] for r in sections["compare"]["result"]["results"] if "error" not in r}
    assert {"dpo_packed", "eps_packed"} <= compared
    assert str(tmp_path) not in page.split("## 5.")[1]  # no temporary paths on the page
    written = (page + out.with_suffix(".json").read_text()).replace(str(out), "")  # --out is in the command
    assert tempfile.gettempdir() not in written  # nor on the page nor in the JSON: the run's temporary files


@pytest.mark.slow
def test_a_killed_run_keeps_the_sections_it_finished(tmp_path):
    """SIGKILL after the first section lands: the page and the JSON hold it, whole, and say which
    section was running."""
    out = tmp_path / "gpu_check.md"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--sections", "kernel,layouts",
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_cpu_env())
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.with_suffix(".json").exists():
                sections = json.loads(out.with_suffix(".json").read_text())["sections"]
                if sections["kernel"]["status"] == "done" and sections["layouts"]["status"] == "running":
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    sections = json.loads(out.with_suffix(".json").read_text())["sections"]
    assert sections["kernel"]["status"] == "done"
    assert [r["ok"] for r in sections["kernel"]["result"]["rows"]] == [True] * 4
    assert sections["layouts"]["status"] == "running"
    page = out.read_text()
    kernel = page.split("## 1. Fused kernel")[1].split("## 2.")[0]
    assert kernel.count("| pass |") == 4
    assert "running (the run stopped before this section ended)" in page
    assert " min so far, " in page


def _trivial(gpu_check, key, run):
    return gpu_check.Section(key, f"section {key}", run, lambda result: [f"rows of {key}: {result['rows']}", ""],
                             None, "–")


def test_a_raising_check_is_recorded_and_later_checks_still_run(gpu_check, monkeypatch, tmp_path):
    ran = []

    def raising_section(context):
        raise ValueError("the oracle ran out of memory\nsecond line of the traceback text")

    def rows_one_raising(context):
        def bad():
            raise RuntimeError("CUDA error: an illegal memory access")

        return dict(rows=[gpu_check.guarded(dict(row=1), bad), gpu_check.guarded(dict(row=2), lambda: dict(ok=True))])

    def last(context):
        ran.append("last")
        return dict(rows=[dict(ok=True)])

    monkeypatch.setattr(gpu_check, "sections", lambda tiny: [
        _trivial(gpu_check, "first", raising_section), _trivial(gpu_check, "second", rows_one_raising),
        _trivial(gpu_check, "third", last)])
    out = tmp_path / "page.md"
    assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 1
    sections = json.loads(out.with_suffix(".json").read_text())["sections"]
    assert sections["first"] == dict(status="failed", error="ValueError: the oracle ran out of memory",
                                     wall_s=sections["first"]["wall_s"])
    assert sections["second"]["status"] == "done"
    assert sections["second"]["result"]["rows"] == [
        dict(row=1, ok=False, error="RuntimeError: CUDA error: an illegal memory access"), dict(row=2, ok=True)]
    assert ran == ["last"] and sections["third"]["status"] == "done"
    page = out.read_text()
    assert "**FAIL** (ValueError: the oracle ran out of memory)" in page
    assert "**failed: first (ValueError: the oracle ran out of memory), second (**FAIL** (RuntimeError" in page


def test_the_deadline_stops_the_running_section_and_marks_the_rest_not_run(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "sections", lambda tiny: [
        _trivial(gpu_check, "quick", lambda context: dict(rows=[dict(ok=True)])),
        _trivial(gpu_check, "endless", lambda context: time.sleep(60)),
        _trivial(gpu_check, "after", lambda context: dict(rows=[dict(ok=True)]))])
    out = tmp_path / "page.md"
    started = time.perf_counter()
    assert gpu_check.main(["--device", "cpu", "--out", str(out), "--deadline", "1.5"]) == 3  # unfinished
    assert time.perf_counter() - started < 10
    sections = json.loads(out.with_suffix(".json").read_text())["sections"]
    assert sections["quick"]["status"] == "done"
    assert sections["endless"]["status"] == "not run"
    assert sections["endless"]["reason"] == "stopped at the --deadline of 2 s"
    assert sections["after"] == dict(status="not run", reason="the --deadline of 2 s had passed")
    assert "Not run: endless, after." in out.read_text()
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no alarm left behind


def test_a_rerun_keeps_the_hand_written_verdict_under_the_title(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "sections", lambda tiny: [
        _trivial(gpu_check, "quick", lambda context: dict(rows=[dict(ok=True)]))])
    from report_page import VERDICT_MARKER  # examples/, on the path once gpu_check is loaded

    out = tmp_path / "page.md"
    verdict = f"**Verdict:** every check passes on one H100.\n{VERDICT_MARKER}"
    out.write_text(f"# GPU check\n\n{verdict}\n\nold numbers\n")
    assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[:4] == ["# GPU check", "", *verdict.splitlines()]
    assert "old numbers" not in out.read_text() and "rows of quick" in out.read_text()


def test_a_subprocess_past_its_timeout_is_killed_with_its_children(gpu_check):
    child = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
             "print(p.pid, file=sys.stderr, flush=True); time.sleep(60)")
    started = time.perf_counter()
    with pytest.raises(gpu_check.SubprocessTimeout, match="timed out after 1 s") as timeout:
        gpu_check.run_subprocess([sys.executable, "-c", child], timeout=1.0)
    assert time.perf_counter() - started < 10
    grandchild = int(timeout.value.stderr.split()[0])
    for _ in range(100):
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the timed-out subprocess's child {grandchild} is still running")


def test_without_trl_the_trl_rows_are_skipped_with_the_extra_that_installs_it(gpu_check, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "trl" else real_find_spec(name, *args))
    commands = []

    def no_train_compare(command, timeout, env=None):
        commands.append(command)
        return 1, "", "train_compare stood in for by the test"

    monkeypatch.setattr(gpu_check, "run_subprocess", no_train_compare)
    result = gpu_check.compare_run(0)(_context(gpu_check))
    cases = commands[0][commands[0].index("--cases") + 1].split(",")
    assert "trl" not in cases and {"dpo_packed", "eps_packed"} <= set(cases)
    assert result["trl_skipped"] == "the × TRL rows are not run: trl is not installed (pip install 'epsdpo[bench]')"
    assert result["ok"] is False and result["error"] == "train_compare.py exited with code 1"
    assert "The × TRL rows are not run: trl is not installed (pip install 'epsdpo[bench]')." in gpu_check.render_compare(result)
    for args in gpu_check.compare_args(False, with_trl=False):
        assert "trl" not in args[args.index("--cases") + 1].split(",")


# --------------------------------------------------------------------------------------------------
# a row naming a kernel fails unless that kernel ran


def _segment_kernel(calls):
    """A CPU stand-in for torch's varlen kernel (same call as epsdpo.attention makes): causal sdpa per
    segment, window_size read as flash-attention reads it (left, right) = tokens seen on each side."""

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append(tuple(window_size))
        left = window_size[0]
        outputs = []
        bounds = cu_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            index = torch.arange(end - start)
            offset = index[:, None] - index[None, :]
            allowed = (offset >= 0) & ((offset <= left) if left >= 0 else True)
            outputs.append(F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
                attn_mask=allowed, scale=scale, enable_gqa=enable_gqa).transpose(0, 1))
        return torch.cat(outputs)

    return varlen_attn


def _context(gpu_check):
    return gpu_check.Context(device=torch.device("cpu"), spec=gpu_check.sizes(True), tiny=True, case_timeout=60,
                             deadline_at=time.perf_counter() + 600)


@pytest.mark.slow
def test_a_row_naming_a_kernel_fails_when_the_spy_counted_no_call(gpu_check):
    """On CPU the varlen kernel and flex never run: rows that name them, forced to run here, must
    fail with the counts (the old rows ran the per-segment loop and the 4-D mask and passed)."""
    paths = [gpu_check.AttentionPath("torch varlen_attn, sliding window 6", "sdpa", ("packed",), window=6,
                                     expects=gpu_check.VARLEN, precisions=("float32",)),
             gpu_check.AttentionPath("flex_attention (shared prompt)", "sdpa", ("shared_prompt",),
                                     expects=gpu_check.FLEX, precisions=("float32",))]
    varlen, flex = gpu_check.check_layouts(_context(gpu_check), paths)["rows"]
    for row, kernel in ((varlen, "torch varlen_attn"), (flex, "flex_attention")):
        assert row["logp_rel_error"] < 1e-4  # the layouts agree: only the counts fail the row
        assert row["ok"] is False and row["calls"] == {"varlen": 0, "flex": 0}
        assert row["problems"] == [f"{kernel} ran 0 times: the path this row names did not run"]
        assert f"{kernel} ran 0 times" in gpu_check._verdict(row)


@pytest.mark.slow
def test_a_varlen_row_passes_when_the_kernel_ran_with_the_window_convention(gpu_check, monkeypatch):
    """The positive control, through epsdpo.attention's own varlen call: with a stand-in kernel that
    reads window_size as flash-attention does, the sliding-window row sees (W − 1, 0) on every call
    and packed equals padded (transformers' sliding-window mask), so the convention is exercised."""
    import epsdpo.attention as attention

    calls = []
    monkeypatch.setattr(attention, "_varlen_attn", lambda: _segment_kernel(calls))
    monkeypatch.setattr(attention, "varlen_kernel_supports", lambda device, dtype: True)  # CPU, float32 too
    path = gpu_check.AttentionPath("torch varlen_attn, sliding window 6", "sdpa", ("packed",), window=6,
                                   expects=gpu_check.VARLEN, precisions=("float32",))
    [row] = gpu_check.check_layouts(_context(gpu_check), [path])["rows"]
    assert row["ok"], row
    assert row["calls"]["varlen"] == len(calls) > 0 and row["windows"] == [(5, 0)]
    # a kernel called with another window is caught twice: by the convention check and by the values
    assert gpu_check.path_problems(gpu_check.VARLEN, {"varlen": 2, "flex": 0}, [(6, 0), (5, 0)], 6, 40) == [
        "varlen window_size [(6, 0)], not (6 − 1, 0) = (5, 0)"]
    assert gpu_check.path_problems(gpu_check.VARLEN, {"varlen": 2, "flex": 0}, [(5, 0)], 6, 6) == [
        "no sequence is longer than the window of 6 tokens (6)"]
