"""Where logged metrics go: the in-memory history, `metrics.jsonl`, and the logging backends a run
names in `report_to` (TensorBoard, Weights & Biases, Trackio, MLflow), each through its own library;
an evaluation's main metrics also go to the console (`eval_summary`). Only rank 0 writes. TensorBoard
is laid out as transformers lays it out (`output_dir/runs/<date>_<host>`, `train/` and `eval/` tags),
so that dashboards built on TRL runs line up; `RunTotals` is transformers' closing summary."""

from __future__ import annotations

import importlib.util
import json
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

BACKENDS = ("tensorboard", "wandb", "trackio", "mlflow")
# The module each backend needs (TensorBoard's writer ships with torch but needs the tensorboard package)
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def resolve_backends(report_to: str | list[str]) -> list[str]:
    """The backends `report_to` names: a list of them, one name, "all" (every installed one), or "jsonl" /
    "none" (no backend; "none" also writes no metrics.jsonl). A named backend that is not installed is an
    error naming the package, where TRL would fail on import later."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names in (["jsonl"], ["none"], []):
        return []
    if names == ["all"]:
        return [b for b in BACKENDS if importlib.util.find_spec(_MODULES[b]) is not None]
    missing = [b for b in names if importlib.util.find_spec(_MODULES[b]) is None]
    if missing:
        raise ModuleNotFoundError(f"report_to names {', '.join(missing)}, which is not installed: "
                                  f"pip install {' '.join(_MODULES[b] for b in missing)}")
    return names


def tensorboard_dir(output_dir: Path) -> Path:
    """transformers' default logging_dir, under output_dir: `runs/<Mon>DD_HH-MM-SS_<host>`, one per run."""
    return output_dir / "runs" / f"{datetime.now().strftime('%b%d_%H-%M-%S')}_{socket.gethostname()}"


def tensorboard_tag(key: str) -> str:
    """transformers' TensorBoard tag of a logged key: eval_x → eval/x, test_x → test/x, anything else
    train/x (epsdpo's kl/beta → train/kl/beta), so that dashboards built on TRL runs line up."""
    for prefix in ("eval", "test"):
        if key.startswith(f"{prefix}_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return f"train/{key}"


class _TensorBoard:
    def __init__(self, output_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(tensorboard_dir(output_dir)))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(tensorboard_tag(key), value, step)
        self.writer.flush()  # a dashboard (or a killed run's reader) sees each record as it is logged

    def close(self) -> None:
        self.writer.close()


class _WandbLike:
    """wandb and trackio share one API: init(config=, name=), log(values, step=), finish()."""

    def __init__(self, module: str, output_dir: Path, config: dict[str, Any]) -> None:
        import importlib

        self.library = importlib.import_module(module)
        extra = {"dir": str(output_dir)} if module == "wandb" else {}
        self.run = self.library.init(config=config, name=config.get("run_name"), **extra)

    def log(self, values: dict[str, float], step: int) -> None:
        self.library.log(values, step=step)

    def close(self) -> None:
        self.library.finish()


class _MLflow:
    def __init__(self, output_dir: Path, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=config.get("run_name"))
        mlflow.log_params({k: v for k, v in config.items() if v is not None})

    def log(self, values: dict[str, float], step: int) -> None:
        # MLflow metric names may not contain every character TRL's names use; "/" is allowed
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _open(backend: str, output_dir: Path, config: dict[str, Any]) -> Any:
    if backend == "tensorboard":
        return _TensorBoard(output_dir, config)
    if backend == "mlflow":
        return _MLflow(output_dir, config)
    return _WandbLike(backend, output_dir, config)


class MetricsLog:
    def __init__(self, output_dir: Path, report_to: str | list[str], enabled: bool, config: dict[str, Any]) -> None:
        self.history: list[dict[str, Any]] = []
        self.enabled = enabled and report_to != "none"
        self.path = output_dir / "metrics.jsonl"
        backends = resolve_backends(report_to)  # checked on every rank, so a missing package fails everywhere
        self._backends: list[Any] = []
        if not self.enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._backends = [_open(backend, output_dir, config) for backend in backends]

    def restore(self, history: list[dict[str, Any]]) -> None:
        """After a resume: keep the history and rewrite metrics.jsonl to match it exactly."""
        self.history = list(history)
        if self.enabled:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for backend in self._backends:
            backend.log(values, record["step"])

    def close(self) -> None:
        for backend in self._backends:
            backend.close()


# Logged values that measure the machine, not the run: they differ between two runs of the same training
TIMINGS = ("tokens_per_second", "train_runtime", "train_samples_per_second", "train_steps_per_second")


class RunTotals:
    """What transformers' Trainer logs at the end of train(): this call's runtime and throughput (pairs
    are TRL's samples), and `train_loss`, the mean training loss over every step of the run (a resumed
    run's earlier steps included: `state.loss_sum` and `loss_steps` are checkpointed)."""

    def __init__(self, state: Any) -> None:
        self.state, self.first_step = state, state.global_step
        self.started, self.pairs = time.perf_counter(), 0.0

    def add_step(self, pairs: float, loss: float) -> None:
        self.pairs += pairs
        self.state.loss_sum += loss
        self.state.loss_steps += 1

    def summary(self) -> dict[str, float]:
        runtime = max(time.perf_counter() - self.started, 1e-9)
        return {"train_runtime": runtime, "train_samples_per_second": self.pairs / runtime,
                "train_steps_per_second": (self.state.global_step - self.first_step) / runtime,
                "train_loss": self.state.loss_sum / max(self.state.loss_steps, 1)}


EVAL_SUMMARY = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_kl/pair_beta_mean")


def eval_summary(step: int, metrics: dict[str, float]) -> str:
    """One console line with an evaluation's main metrics, e.g.
    `step 40 eval: loss 0.6712 | rewards/accuracies 0.625 | rewards/margins 0.0413 | kl/pair_beta_mean 0.0987`."""
    shown = [f"{key.removeprefix('eval_')} {metrics[key]:.4g}" for key in EVAL_SUMMARY if key in metrics]
    return f"step {step} eval: " + " | ".join(shown)
