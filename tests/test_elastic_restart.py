"""One command for a run that may be restarted (issue 21, item 5): `resume_from_checkpoint="auto"`
(`--resume_from_checkpoint auto`) starts fresh in an output_dir without a checkpoint and resumes the
newest complete one otherwise, and a torchelastic restart (TORCHELASTIC_RESTART_COUNT > 0) does that
by itself. One process here; tests/test_rank_agreement.py restarts 2 gloo ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from tiny import tiny_llama, toy_store


class Crash(RuntimeError):
    """The failure a restart recovers from."""


def config(out: Path, **overrides) -> TrainConfig:
    base = dict(output_dir=str(out), beta=0.1, epsilon=0.1, learning_rate=3e-3, per_device_train_batch_size=8,
                max_steps=4, warmup_ratio=0.0, lr_scheduler_type="constant", max_length=32, max_prompt_length=16,
                progress=False, plots=False, seed=3, logging_steps=1, save_steps=2)
    return TrainConfig(**{**base, **overrides})


def run(out: Path, resume=None, crash_at: int | None = None, **overrides) -> Trainer:
    trainer = Trainer(tiny_llama(0), config(out, **overrides), toy_store())
    if crash_at is not None:
        real = trainer._train_step

        def step(batches):
            if trainer.state.global_step + 1 == crash_at:
                raise Crash(f"step {crash_at}")
            return real(batches)

        trainer._train_step = step
        with pytest.raises(Crash):
            trainer.train(resume_from_checkpoint=resume)
        return trainer
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def final(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] == want[name]).all(), name


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    return final(run(tmp_path_factory.mktemp("whole")).output_dir)


def steps_logged(out: Path) -> list[int]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "train_runtime" not in r]  # not the run's closing summary


def test_auto_starts_fresh_then_resumes_the_newest_checkpoint(tmp_path, whole):
    out = tmp_path / "run"
    run(out, resume="auto", crash_at=4)  # a fresh start (nothing to resume), killed after checkpoint-2
    assert (out / "checkpoint-2").is_dir() and not (out / "final").exists()
    trainer = run(out, resume="auto")
    assert trainer.resumes[0]["checkpoint"] == "checkpoint-2"
    assert_same_weights(final(out), whole)
    assert steps_logged(out) == [1, 2, 3, 4]


def test_a_restart_resumes_by_itself_even_with_overwrite_output_dir(tmp_path, whole, monkeypatch, capsys):
    """The same command re-run by torchrun: neither refused for the used output_dir nor deleting its
    checkpoints (overwrite_output_dir applies to the first attempt), and it says what it does."""
    out = tmp_path / "run"
    run(out, crash_at=4, overwrite_output_dir=True)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    trainer = run(out, overwrite_output_dir=True)
    assert trainer.resumes[0]["checkpoint"] == "checkpoint-2"
    assert f"epsdpo: torchelastic restart 1: resuming {out / 'checkpoint-2'}" in capsys.readouterr().out
    assert_same_weights(final(out), whole)


def test_a_restart_before_the_first_checkpoint_starts_afresh_over_the_killed_attempt(tmp_path, whole, monkeypatch,
                                                                                       capsys):
    """The first attempt died at step 2, before any checkpoint, leaving its metrics.jsonl: the restart
    clears what that attempt left and trains the whole run."""
    out = tmp_path / "run"
    run(out, crash_at=2)
    assert steps_logged(out) == [1] and not (out / "checkpoint-2").exists()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    trainer = run(out)
    assert trainer.resumes == []
    assert "epsdpo: torchelastic restart 2: no complete checkpoint in" in capsys.readouterr().out
    assert_same_weights(final(out), whole)
    assert steps_logged(out) == [1, 2, 3, 4]


def test_a_restart_never_deletes_a_finished_runs_outputs(tmp_path, monkeypatch):
    """A restart finding no checkpoint but a final/ (a finished run, saving nothing on the way) is not
    a killed attempt of this run: refused, the outputs kept."""
    out = tmp_path / "run"
    run(out, save_strategy="no", max_steps=1)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(FileExistsError, match="a torchelastic restart found no complete checkpoint, and "
                                              r"\S+ is a finished run's output"):
        run(out, save_strategy="no", max_steps=1)
    assert (out / "final" / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()


@pytest.mark.parametrize("value", ["one", "-1", "1.5"])
def test_a_restart_count_that_is_not_one_is_named(tmp_path, monkeypatch, value):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", value)
    trainer = Trainer(tiny_llama(0), config(tmp_path / "run", max_steps=1), toy_store(8))
    with pytest.raises(ValueError, match=f"TORCHELASTIC_RESTART_COUNT={value!r} is"):
        trainer.train()
