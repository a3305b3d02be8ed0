"""transformers' callback protocol in epsdpo's loop: the events come in the order transformers' own
Trainer calls them (the oracle: the same recorder on a transformers Trainer run of the same schedule),
every TrainerControl flag a callback raises is honoured, and callbacks written for TRL work
unchanged: transformers' EarlyStoppingCallback and a custom logging callback."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers import TrainerState as HfTrainerState

from epsdpo.config_fields import ConfigFieldError
from epsdpo.trainer import Trainer
from test_config_cli import usage_error
from test_trainer import config
from test_trl_config import model_and_data
from tiny import tiny_llama, toy_store

EVENTS = ("on_init_end", "on_train_begin", "on_epoch_begin", "on_epoch_end", "on_step_begin", "on_step_end",
          "on_log", "on_evaluate", "on_save", "on_train_end")


class Recorder(TrainerCallback):
    """Every event of EVENTS with the step it came at."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def __getattribute__(self, name):
        if name in EVENTS:
            return lambda args, state, control, **kwargs: self.events.append((name, state.global_step))
        return super().__getattribute__(name)


class FlagAt(TrainerCallback):
    """Raises one TrainerControl flag at the end of one step."""

    def __init__(self, flag: str, step: int) -> None:
        self.flag, self.step = flag, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            setattr(control, self.flag, True)
        return control


class LossLogger(TrainerCallback):
    """A custom logging callback as a TRL user writes one (main process only, logs as they come)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.summary: dict | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or logs is None:
            return
        if "loss" in logs:
            self.rows.append({"step": state.global_step, "epoch": logs["epoch"], "loss": logs["loss"],
                              "lr": logs["learning_rate"], "tokens": logs["num_tokens"]})
        if "train_runtime" in logs:
            self.summary = dict(logs)

    def on_train_end(self, args, state, control, **kwargs):
        self.history_length = len(state.log_history)


def run(tmp_path, callbacks, eval_data=True, **overrides):
    trainer = Trainer(tiny_llama(0), config(tmp_path, **overrides), toy_store(32),
                      eval_dataset=toy_store(16, seed=5) if eval_data else None, callbacks=callbacks)
    trainer.train()
    return trainer


def test_events_come_in_transformers_order(tmp_path):
    """One epoch of 4 steps, logging every step, evaluating and saving every 2: the recorder sees what
    it sees on transformers' Trainer (which TRL's DPOTrainer is) running the same schedule."""
    from transformers import Trainer as HfTrainer
    from transformers import TrainingArguments

    theirs = Recorder()
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, logging_steps=1, eval_strategy="steps",
                             eval_steps=2, save_steps=2, report_to="none", use_cpu=True, disable_tqdm=True,
                             per_device_train_batch_size=2, per_device_eval_batch_size=2)
    rows = [{"input_ids": torch.arange(2, 10), "labels": torch.arange(2, 10)} for _ in range(8)]
    HfTrainer(model=tiny_llama(0), args=args, train_dataset=rows, eval_dataset=rows[:2], callbacks=[theirs]).train()

    ours = Recorder()
    run(tmp_path, [ours], max_steps=4, eval_steps=2, save_steps=2)  # 32 pairs of 8: one epoch of 4 steps
    assert ours.events == theirs.events
    assert ours.events[-2:] == [("on_log", 4), ("on_train_end", 4)]  # the run's summary, then the end


@pytest.mark.parametrize("flag,step", [("should_save", 3), ("should_evaluate", 1), ("should_log", 2)])
def test_a_raised_flag_is_acted_on(tmp_path, flag, step):
    """No setting asks for anything at that step (logging, evaluation and saves off): the callback's
    flag alone makes it happen, once."""
    trainer = run(tmp_path, [FlagAt(flag, step)], max_steps=4, logging_strategy="no", eval_strategy="no")
    out = tmp_path / "run"
    saved = sorted(p.name for p in out.glob("checkpoint-*"))
    evaluated = [r["step"] for r in trainer.state.log_history if "eval_loss" in r]
    logged = [r["step"] for r in trainer.state.log_history if "loss" in r]
    assert (saved, evaluated, logged) == {
        "should_save": ([f"checkpoint-{step}"], [], []),
        "should_evaluate": ([], [step], []),
        "should_log": ([], [], [step]),
    }[flag]
    if flag == "should_save":  # a checkpoint like any other: it resumes
        resumed = Trainer(tiny_llama(0), config(tmp_path / "again", max_steps=4), toy_store(32))
        resumed.train(resume_from_checkpoint=out / f"checkpoint-{step}")
        torch.testing.assert_close(dict(resumed.model.named_parameters()), dict(trainer.model.named_parameters()))


def test_should_training_stop_ends_the_run_with_its_outputs(tmp_path):
    trainer = run(tmp_path, [FlagAt("should_training_stop", 2)], max_steps=10, eval_data=False)
    out = tmp_path / "run"
    assert trainer.state.global_step == 2 and trainer.kl.beta_history().shape == (3,)
    assert [r["step"] for r in trainer.state.log_history if "loss" in r] == [1, 2]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "llama"


def test_a_flag_without_eval_data_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"step 1: a callback asked for an evaluation \(control.should_evaluate\)"):
        run(tmp_path, [FlagAt("should_evaluate", 1)], max_steps=2, eval_data=False)


def test_transformers_early_stopping_stops_the_run_and_the_best_metric_is_kept(tmp_path):
    """EarlyStoppingCallback as a TRL user adds it. A threshold no change in loss can pass: the second
    evaluation is no improvement, and with patience 1 the run stops there."""
    stopper = EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=10.0)
    trainer = run(tmp_path, [stopper], max_steps=20, eval_steps=1, save_steps=1, metric_for_best_model="loss")
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    assert trainer.state.global_step == 2 and [r["step"] for r in evals] == [1, 2]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert trainer.state.best_metric == best["eval_loss"] and trainer.state.best_global_step == best["step"]
    saved = HfTrainerState.load_from_json(str(tmp_path / "run" / "checkpoint-2" / "trainer_state.json"))
    assert saved.best_model_checkpoint == str(tmp_path / "run" / f"checkpoint-{best['step']}")
    assert saved.stateful_callbacks["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"] == 1


def test_early_stopping_needs_metric_for_best_model_as_in_transformers(tmp_path):
    with pytest.raises(AssertionError, match="requires metric_for_best_model"):
        run(tmp_path, [EarlyStoppingCallback()], max_steps=2)


@pytest.mark.parametrize(("metric", "eval_data", "message"), [
    ("acuracy", True, r"metric_for_best_model='acuracy' is invalid: must be a metric the evaluation reports, "
                      r"eval_ prefix optional: eval_loss, eval_rewards/chosen"),
    ("eval_rewards/accuracie", True, r"metric_for_best_model='eval_rewards/accuracie' is invalid: must be a metric"),
    ("loss", False, r"metric_for_best_model='loss' is invalid: no eval_dataset was given"),
])
def test_a_best_metric_that_cannot_be_kept_is_refused_before_training(tmp_path, metric, eval_data, message):
    """A misspelt metric would stop the run at its first evaluation; one without eval data would keep no
    best metric and say nothing. Both are refused before the first step, naming the field."""
    with pytest.raises(ConfigFieldError, match=f"^{message}") as refused:
        run(tmp_path, [], eval_data=eval_data, max_steps=2, metric_for_best_model=metric,
            eval_steps=1 if eval_data else None)
    assert refused.value.field == "metric_for_best_model"
    assert not (tmp_path / "run").exists()


def test_epsdpo_train_refuses_a_misspelt_best_metric_in_one_usage_line(tmp_path, capsys):
    model, data = model_and_data(tmp_path)
    capsys.readouterr()  # the fixture's own output
    line = usage_error(capsys, "train", "--model", str(model), "--train_data", str(data), "--output_dir",
                       str(tmp_path / "out"), "--eval_data", str(data), "--eval_steps", "1",
                       "--metric_for_best_model", "acuracy")
    assert "argument --metric_for_best_model: metric_for_best_model='acuracy' is invalid" in line
    assert not (tmp_path / "out").exists()


def test_load_best_model_at_end_is_refused_with_the_reason():
    from epsdpo.config import TrainConfig

    with pytest.raises(ValueError, match="load_best_model_at_end=True is invalid: must be False: the final model "
                                         "is the last step's"):
        TrainConfig(load_best_model_at_end=True)


def test_a_custom_logging_callback_sees_what_trl_logs(tmp_path):
    logger = LossLogger()
    trainer = run(tmp_path, [logger], max_steps=4, eval_data=False)
    history = [r for r in trainer.state.log_history if "loss" in r]
    assert [row["loss"] for row in logger.rows] == [r["loss"] for r in history]
    assert [row["epoch"] for row in logger.rows] == [0.25, 0.5, 0.75, 1.0]
    tokens = [row["tokens"] for row in logger.rows]
    assert tokens == sorted(tokens) and tokens[0] > 0  # num_tokens counts up, as TRL's does
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
            "epoch"} <= set(logger.summary)
    assert logger.summary["train_loss"] == pytest.approx(sum(r["loss"] for r in history) / 4)
    assert logger.history_length == len(trainer.state.log_history)


def test_add_pop_and_remove_callback(tmp_path):
    first, second = Recorder(), Recorder()
    trainer = Trainer(tiny_llama(0), config(tmp_path, max_steps=1), toy_store(32), callbacks=[first])
    trainer.add_callback(second)
    trainer.add_callback(LossLogger)  # a class is instantiated, as in transformers
    assert trainer.pop_callback(LossLogger).__class__ is LossLogger
    trainer.remove_callback(first)
    trainer.train()
    assert first.events == [("on_init_end", 0)] and ("on_train_end", 1) in second.events


@pytest.mark.slow
def test_a_flag_raised_on_one_rank_is_acted_on_by_every_rank(tmp_path):
    """Under torchrun a save, an evaluation and a stop are collectives: raised by one rank's callback,
    every rank acts on it (no hang, one checkpoint, one evaluation, both ranks stop at step 3)."""
    from torchrun_job import run_torchrun

    done = run_torchrun("dist_callback_worker.py", tmp_path, nproc=2, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1] == {"seen": [["save", 1], ["evaluate", 2]], "step": 3}
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (tmp_path / "config.json").is_file() and (tmp_path / "final" / "config.json").is_file()
