"""The `epsdpo` command end to end on a tiny model saved to disk."""

from __future__ import annotations

import json

import pytest

from epsdpo.cli import main
from tiny import tiny_llama, toy_store


def test_train_from_yaml_with_overrides(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "model")
    toy_store(32).save(tmp_path / "train.store")
    (tmp_path / "run.yaml").write_text(
        f"model: {tmp_path / 'model'}\ntrain_data: {tmp_path / 'train.store'}\n"
        f"output_dir: {tmp_path / 'out'}\nmax_steps: 5\nper_device_train_batch_size: 4\n"
        "max_length: 32\nmax_prompt_length: 16\nprogress: false\nplots: true\nlearning_rate: 1e-3\nlogging_steps: 1\n"
    )
    assert main(["train", str(tmp_path / "run.yaml"), "--max_steps=2", "--layout=packed", "--epsilon=0.2"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train_runtime" not in r] == [1, 2]  # the run's summary ends the log
    assert (tmp_path / "out" / "final" / "config.json").exists()
    assert (tmp_path / "out" / "plots" / "beta.png").stat().st_size > 1000


def test_bad_override_is_reported(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("model: x\ntrain_data: y\n")
    for override, named in (("--layout=ragged", "argument --layout: invalid choice: 'ragged'"),
                            ("--no_such_key=1", "unrecognized arguments: --no_such_key=1"),
                            ("--beta=abc", "argument --beta: invalid float value: 'abc'"),
                            ("--bf16=nope", "argument --bf16: expected a boolean")):
        with pytest.raises(SystemExit) as exit_:
            main(["train", str(tmp_path / "run.yaml"), override])
        assert exit_.value.code == 2
        assert named in capsys.readouterr().err
