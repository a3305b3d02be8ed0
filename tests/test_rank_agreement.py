"""The ranks of one run train the same run or stop together (issue 21, items 1, 2 and 5), on 2 gloo
ranks under torchrun (tests/dist_agree_worker.py): settings or data given differently to one rank
(a stale YAML on one node), a resume whose ranks see different checkpoints (node-local disks), and
an elastic restart that re-runs the same command. Every launch has a hard timeout: a regression
that leaves the ranks waiting in mismatched collectives fails instead of hanging the suite."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from torchrun_job import run_torchrun

TIMEOUT = 120  # a passing launch takes seconds; a hang is torch's 30-minute collective timeout


def launch(out: Path, scenario: str) -> tuple[list[dict], subprocess.CompletedProcess]:
    """tests/dist_agree_worker.py on 2 gloo ranks; how each rank ended (None for a rank that died)."""
    out.mkdir(parents=True, exist_ok=True)
    done = run_torchrun("dist_agree_worker.py", out, scenario, timeout=TIMEOUT)
    ranks = [json.loads(f.read_text()) if (f := out / f"rank{r}.json").is_file() else None for r in (0, 1)]
    return ranks, done


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("scenario, named", [
    # trains silently on a mix without the check: rank 1's pairs at twice the β, its replica at another rate
    ("differ:beta=0.2,learning_rate=0.001,data",
     ["beta (0.1 on rank 0, 0.2 on rank 1)", "learning_rate (0.003 on rank 0, 0.001 on rank 1)", "train_data ("]),
    # hangs without the check: FSDP on one rank only, another step count and save schedule
    ("differ:fsdp=true,max_steps=4,save_steps=3",
     ["fsdp (false on rank 0, true on rank 1)", "max_steps (6 on rank 0, 4 on rank 1)", "save_steps (2 on rank 0"]),
])
def test_ranks_given_different_settings_stop_together_naming_them(tmp_path, scenario, named):
    ranks, done = launch(tmp_path / "run", scenario)
    assert [r and r["ended"] for r in ranks] == ["RanksDisagreeError"] * 2, (ranks, done.stderr[-2000:])
    assert ranks[0]["message"] == ranks[1]["message"] and "\n" not in ranks[0]["message"]
    for part in named:
        assert part in ranks[0]["message"], ranks[0]["message"]
    assert not (tmp_path / "run" / "checkpoint-2").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The run left alone: its checkpoints 2, 4 and 6 and its final weights."""
    out = tmp_path_factory.mktemp("whole")
    ranks, done = launch(out, "whole")
    assert [r["ended"] for r in ranks] == ["finished"] * 2, (ranks, done.stderr[-2000:])
    return out


@pytest.mark.slow
def test_a_resume_is_the_checkpoint_rank_0_chooses_and_every_rank_must_see_it(tmp_path, whole):
    """Node-local output_dirs (a per-node setting): rank 0's disk holds checkpoint-2 and checkpoint-4,
    rank 1's a stale copy holding checkpoint-2 only. Each rank resolving `resume_from_checkpoint=True`
    on its own would load different weights (then hang); rank 0 chooses checkpoint-4 and both stop,
    naming what rank 1 lacks. Another checkpoint-4 on rank 1 is refused too; the same one resumes."""
    from epsdpo.checkpoint import MANIFEST

    out = tmp_path / "run"
    node0, node1 = out / "node0", out / "node1"
    for node, names in ((node0, ("checkpoint-2", "checkpoint-4")), (node1, ("checkpoint-2",))):
        for name in names:
            shutil.copytree(whole / name, node / name)

    ranks, done = launch(out, "local")
    assert [r and r["ended"] for r in ranks] == ["RanksDisagreeError"] * 2, (ranks, done.stderr[-2000:])
    assert ("rank 0 resumes checkpoint-4, but rank 1 has no complete checkpoint-4 in its output_dir (its newest: "
            "checkpoint-2)") in ranks[0]["message"]
    assert ranks[1]["message"] == ranks[0]["message"]

    shutil.copytree(whole / "checkpoint-4", node1 / "checkpoint-4")
    manifest = (node1 / "checkpoint-4" / MANIFEST).read_text()
    (node1 / "checkpoint-4" / MANIFEST).write_text(manifest.replace("{", '{"stale": true, ', 1))
    ranks, done = launch(out, "local")
    assert [r and r["ended"] for r in ranks] == ["RanksDisagreeError"] * 2, (ranks, done.stderr[-2000:])
    assert "rank(s) 1 hold a different checkpoint-4 (another manifest)" in ranks[0]["message"]

    (node1 / "checkpoint-4" / MANIFEST).write_text(manifest)
    ranks, done = launch(out, "local")
    assert [r and r["ended"] for r in ranks] == ["finished"] * 2, (ranks, done.stderr[-2000:])
    want, got = weights(whole / "final"), weights(node0 / "final")
    for name in want:
        assert (got[name] == want[name]).all(), name


@pytest.mark.slow
def test_an_elastic_restart_continues_to_the_uninterrupted_runs_weights(tmp_path, whole):
    """torchrun --max-restarts re-runs the same command with TORCHELASTIC_RESTART_COUNT=1. Its own
    restarts over gloo are unreliable in torch 2.x whatever the script (a plain-torch one failed or
    hung in 6 of 11, reconnecting to the previous attempt's ports), so the restart is run as torchrun
    performs it: the same command again, with the count set, after both ranks died at step 5."""
    out = tmp_path / "elastic"
    ranks, done = launch(out, "crash")
    assert done.returncode != 0 and ranks == [None, None], done.stderr[-2000:]
    assert (out / "checkpoint-4" / "manifest.json").is_file() and not (out / "final").exists()
    ranks, done = launch(out, "restart")
    assert [r and r["ended"] for r in ranks] == ["finished", "finished"], (ranks, done.stderr[-2000:])
    assert f"epsdpo: torchelastic restart 1: resuming {out / 'checkpoint-4'}" in done.stdout
    want, got = weights(whole / "final"), weights(out / "final")
    for name in want:
        assert (got[name] == want[name]).all(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_runtime" not in r] == [1, 2, 3, 4, 5, 6]
