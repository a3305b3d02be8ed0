"""Hooks into the training loop through transformers' own callback protocol: `TrainerCallback`,
`TrainerState`, `TrainerControl` and `CallbackHandler`, so that a callback written for TRL's
DPOTrainer (early stopping, a custom logger) runs here unchanged.

The loop (`epsdpo.trainer`) calls the handler's events in transformers' order and then acts on the
control flags: `should_log`, `should_evaluate`, `should_save` after each step, and
`should_training_stop` before the next. `ScheduleCallback` is the run's own schedule written as
transformers writes it (`DefaultFlowCallback`), with TrainConfig's strategies: it sets the flags the
settings ask for, and any callback after it may set more. Under torchrun a flag set on one rank is
set on all (`agree_across_ranks`): a save or an evaluation is a collective, and a rank that stops
alone would leave the others waiting in the next step.

`args` in every event is the run's TrainConfig, which carries the TrainingArguments fields
callbacks read (`eval_strategy`, `metric_for_best_model`, `greater_is_better`,
`load_best_model_at_end`, `logging_steps`, `output_dir`, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback, TrainerControl
from transformers import TrainerState as HfTrainerState
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, ExportableState

from epsdpo.config_fields import ConfigFieldError
from epsdpo.distributed import DistInfo, all_reduce_sum
from epsdpo.step_metrics import StepSums

if TYPE_CHECKING:
    from epsdpo.config import TrainConfig

__all__ = ["TrainerCallback", "TrainerControl", "TrainerState", "CallbackHandler", "ScheduleCallback",
           "agree_across_ranks", "best_metric_improved"]

# the flags a callback may raise; each is acted on by every rank or by none
_FLAGS = ("should_log", "should_evaluate", "should_save", "should_training_stop")


class TrainerState(HfTrainerState):
    """transformers' TrainerState, plus the run's current base β as a plain attribute (not a dataclass
    field): `save_to_json` writes transformers' keys only, so `transformers.TrainerState.load_from_json`
    reads the file back; β's own state is saved beside it (`epsdpo_state.json`)."""

    beta: float = 0.0
    # the training loss summed over the steps counted so far, for train_loss at the end (checkpointed, so
    # that a resumed run's train_loss covers its earlier steps too)
    loss_sum: float = 0.0
    loss_steps: int = 0


class ScheduleCallback(DefaultFlowCallback):
    """When the run logs, evaluates and saves, from TrainConfig's strategies (steps / epoch / no; None:
    by steps when an interval is set). Replaces transformers' DefaultFlowCallback, whose rules read
    TrainingArguments' enums; like it, the last step is logged, and saved under an explicit steps or
    epoch save_strategy. Evaluation at the end of training is the loop's (`Trainer._train`)."""

    def __init__(self, has_eval_data: bool) -> None:
        self.has_eval_data = has_eval_data

    def on_step_end(self, args: TrainConfig, state: HfTrainerState, control: TrainerControl, **kwargs: Any) -> None:
        step, last = state.global_step, state.global_step >= state.max_steps
        if args.logging_strategy == "steps" and _every(args.logging_steps, step):
            control.should_log = True
        first = step == 1 and getattr(args, "logging_first_step", False)
        if args.logging_strategy != "no" and (last or first):
            control.should_log = True
        if self.has_eval_data and args.eval_strategy in (None, "steps") and _every(args.eval_every(), step):
            control.should_evaluate = True
        if args.save_strategy in (None, "steps") and _every(args.save_every(), step):
            control.should_save = True
        if last:
            control.should_training_stop = True
            if args.save_strategy in ("steps", "epoch"):  # as DefaultFlowCallback saves at max_steps
                control.should_save = True

    def on_epoch_end(self, args: TrainConfig, state: HfTrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.has_eval_data and args.eval_strategy == "epoch":
            control.should_evaluate = True
        if state.global_step >= state.max_steps:
            return  # the last step was logged and saved after it ended (on_step_end)
        if args.logging_strategy == "epoch":
            control.should_log = True
        if args.save_strategy == "epoch":
            control.should_save = True


def _every(interval: int | None, step: int) -> bool:
    return bool(interval) and step % interval == 0


def agree_across_ranks(control: TrainerControl, dist: DistInfo) -> None:
    """Raise on every rank each flag any rank's callbacks raised (one all-reduce of four numbers)."""
    if not dist.enabled:
        return
    raised = torch.tensor([float(getattr(control, flag)) for flag in _FLAGS], dtype=torch.float64)
    for flag, count in zip(_FLAGS, all_reduce_sum(raised, dist).tolist()):
        setattr(control, flag, count > 0)


def _eval_key(name: str) -> str:
    """The evaluation's key of `metric_for_best_model` (its eval_ prefix optional, as in transformers)."""
    return name if name.startswith("eval_") else f"eval_{name}"


def check_metric_for_best_model(args: TrainConfig, has_eval_data: bool) -> None:
    """`metric_for_best_model` names a metric the evaluation reports, in a run that evaluates: refused
    before training, not found wanting at the first evaluation (transformers' KeyError, hours in) or
    never used at all (no eval data, no best metric kept)."""
    name = args.metric_for_best_model
    if name is None:
        return
    reported = list(StepSums().metrics(prefix="eval_"))
    if _eval_key(name) not in reported:
        raise ConfigFieldError("metric_for_best_model", name,
                               f"a metric the evaluation reports, eval_ prefix optional: {', '.join(reported)}")
    if not has_eval_data:
        raise ConfigFieldError("metric_for_best_model", name, "set only with eval data",
                               reason="no eval_dataset was given, so nothing is evaluated and no best metric is "
                                      "kept: pass eval_dataset or leave metric_for_best_model unset")


def best_metric_improved(args: TrainConfig, state: HfTrainerState, metrics: dict[str, float]) -> bool:
    """transformers' rule for `state.best_metric` after an evaluation: with `metric_for_best_model` set
    (checked before training: `check_metric_for_best_model`), a new best (greater, or smaller unless
    `greater_is_better`) is recorded with its step."""
    name = args.metric_for_best_model
    if name is None:
        return False
    value, greater = metrics[_eval_key(name)], args.greater_is_better_resolved()
    if state.best_metric is None or (value > state.best_metric if greater else value < state.best_metric):
        state.best_metric, state.best_global_step = value, state.global_step
        return True
    return False


def stateful_callbacks(handler: CallbackHandler, control: TrainerControl) -> dict[str, Any]:
    """The states of the callbacks that export one (and the control's), keyed as transformers keys
    them in trainer_state.json's `stateful_callbacks`."""
    exportable = [cb for cb in [*handler.callbacks, control] if isinstance(cb, ExportableState)]
    return HfTrainerState(stateful_callbacks=exportable).stateful_callbacks
