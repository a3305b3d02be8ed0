"""The controlled experiment's quick form: the pipeline runs end to end, writes its page, plots and raw
results, reruns nothing it has, and gives the same numbers twice. Its conclusion is not tested here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "controlled_frontier.py"
TIMINGS = {"train_seconds", "eval_seconds"}

pytestmark = pytest.mark.slow


def quick(out: Path, docs: Path) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--docs", str(docs)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def without_timings(report: dict) -> list[dict]:
    return [{k: v for k, v in run.items() if k not in TIMINGS} for run in report["runs"]]


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    root = tmp_path_factory.mktemp("quick")
    stdout = quick(root / "out", root / "docs")
    report = json.loads((root / "docs" / "controlled_frontier_quick.json").read_text())
    return root, report, stdout


def test_quick_run_writes_page_plots_and_raw_results(first: tuple[Path, dict, str]) -> None:
    root, report, _ = first
    docs = root / "docs"
    design = report["design"]
    expected_runs = design["seeds"] * len(design["betas"]) * len(design["arms"]) * len(design["label_temperatures"])
    assert len(report["runs"]) == expected_runs
    for run in report["runs"]:
        assert run["steps"] == design["train_pairs"] // design["batch_size"]
        assert run["kl_se"] > 0 and run["reward_se"] > 0 and 0 <= run["win_rate"] <= 1
        # ε-DPO moves β; every other arm here keeps it
        moved = abs(run["final_beta"] - run["beta"]) > 1e-12
        assert moved == (run["arm"].startswith("ε-DPO")), run
    page = (docs / "controlled_frontier_quick.md").read_text()
    for heading in ("## Design", "## Analysis plan", "## Validity checks", "## Primary result",
                    "## ε_s × ε_c ablation", "Fig. 4a", "## Every cell", "## Reading"):
        assert heading in page
    assert (docs / "controlled_frontier_quick.png").stat().st_size > 0
    assert (docs / "controlled_frontier_quick_fig4a.png").stat().st_size > 0
    fig4a = report["analysis"]["fig4a"]
    assert fig4a and len(fig4a["bins"]) == 8
    noise = report["analysis"]["noise"][0]
    assert 0 < noise["label_noise"] < 0.5 and 0 < noise["tie_rate"] < 0.5


def test_rerun_keeps_runs_and_the_hand_written_reading(first: tuple[Path, dict, str]) -> None:
    root, report, _ = first
    page = root / "docs" / "controlled_frontier_quick.md"
    page.write_text(page.read_text().replace("(not written yet)", "A reading written by hand."))
    stdout = quick(root / "out", root / "docs")
    assert f"{len(report['runs'])} runs, 0 to train" in stdout
    assert "A reading written by hand." in page.read_text()
    again = json.loads((root / "docs" / "controlled_frontier_quick.json").read_text())
    assert again["runs"] == report["runs"]


def test_quick_run_is_deterministic(first: tuple[Path, dict, str], tmp_path: Path) -> None:
    _, report, _ = first
    quick(tmp_path / "out", tmp_path / "docs")
    again = json.loads((tmp_path / "docs" / "controlled_frontier_quick.json").read_text())
    assert without_timings(again) == without_timings(report)
    assert again["datasets"] == report["datasets"]
