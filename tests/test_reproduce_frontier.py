"""examples/reproduce_frontier.py stays runnable where it cannot run here: every scale's every cell
makes a valid TrainConfig (the GPU scale waits for a device), and its page keeps the hand-written
reading across reruns."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reproduce_frontier.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("reproduce_frontier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_frontier"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_every_cell_of_every_scale_makes_a_valid_config(script, scale, tmp_path):
    chosen = script.SCALES[scale]
    for method in chosen.methods:
        for beta in chosen.betas:
            config = script.run_config(method, beta, chosen, tmp_path / f"{method}_{beta}")
            assert config.method == method and config.beta == beta
            assert config.step_epsilon == (chosen.epsilon if method == "epsilon_dpo" else 0.0)


def test_the_page_keeps_its_reading_across_reruns(script, tmp_path):
    run = {"method": "epsilon_dpo", "beta": 0.1, "steps": 2, "kl": 0.1, "kl_se": 0.01, "win_rate": 0.6,
           "win_rate_se": 0.05, "gold_score": 0.5, "beta_final": 0.09, "train_seconds": 1, "eval_seconds": 1,
           "reference_gold_score": 0.4}
    meta = {"command": "python examples/reproduce_frontier.py", "machine": "m", "date": "d", "run_minutes": 1.0,
            "wall_minutes": 1.0, "data": "the bundled demo set", "train_pairs": 10, "eval_prompts": 4,
            "scale": script.asdict(script.SCALES["cpu"])}
    page = script.write_page([run], meta, tmp_path)
    page.write_text(page.read_text().replace("(not written yet)", "Read by hand."))
    script.write_page([{**run, "win_rate": 0.7}], meta, tmp_path)
    text = page.read_text()
    assert "Read by hand." in text and "0.700" in text and "(not written yet)" not in text
