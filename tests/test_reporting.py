"""report_to: each logging backend through its own library: tensorboard and mlflow (a local file store)
for real, read back with their own readers; wandb and trackio, not installed, through stand-in modules
recording their calls; metrics.jsonl always, and a missing package named."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest

from epsdpo.config import TrainConfig
from epsdpo.reporting import MetricsLog, resolve_backends


def fake_library(name: str, calls: list, monkeypatch) -> None:
    """A stand-in module with the wandb/trackio or mlflow calls MetricsLog makes, recording them; it also
    makes the package count as installed (tensorboard's test needs only that)."""
    module = types.ModuleType(name)
    module.__spec__ = types.SimpleNamespace(name=name)  # find_spec sees it as installed
    record = lambda call: lambda *a, **k: calls.append((name, call, a, k))  # noqa: E731
    for call in ("init", "log", "finish", "start_run", "log_params", "log_metrics", "end_run"):
        setattr(module, call, record(call))
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr("importlib.util.find_spec", lambda n, *a: module.__spec__ if n in sys.modules and
                        getattr(sys.modules[n], "__spec__", None) is not None else None)


def test_each_named_backend_gets_every_record_through_its_library(tmp_path, monkeypatch):
    calls: list = []
    for name in ("wandb", "trackio", "mlflow"):
        fake_library(name, calls, monkeypatch)
    config = TrainConfig(report_to=["wandb", "trackio", "mlflow"], run_name="r1").to_dict()
    log = MetricsLog(tmp_path, config["report_to"], True, config)
    log.log({"step": 1, "loss": 0.69, "kl/beta": 0.1})
    log.close()
    assert ("wandb", "log", ({"loss": 0.69, "kl/beta": 0.1},), {"step": 1}) in calls
    assert ("trackio", "log", ({"loss": 0.69, "kl/beta": 0.1},), {"step": 1}) in calls
    assert ("mlflow", "log_metrics", ({"loss": 0.69, "kl/beta": 0.1},), {"step": 1}) in calls
    assert [c[2:] for c in calls if c[:2] == ("wandb", "init")][0][1]["name"] == "r1"
    assert [c[2:] for c in calls if c[:2] == ("mlflow", "start_run")][0][1] == {"run_name": "r1"}
    assert {(c[0], c[1]) for c in calls} >= {("wandb", "finish"), ("trackio", "finish"), ("mlflow", "end_run")}
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_all_means_every_installed_backend(monkeypatch):
    fake_library("mlflow", [], monkeypatch)
    assert resolve_backends("all") == ["mlflow"]
    assert resolve_backends("jsonl") == resolve_backends("none") == []


def test_a_named_backend_that_is_not_installed_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda n, *a: None)
    with pytest.raises(ModuleNotFoundError, match="report_to names wandb, which is not installed: pip install wandb"):
        MetricsLog(tmp_path, ["wandb"], True, {})


def test_none_writes_no_metrics_file(tmp_path):
    log = MetricsLog(tmp_path, "none", True, {})
    log.log({"step": 1, "loss": 0.7})
    assert not (tmp_path / "metrics.jsonl").exists() and log.history == [{"step": 1, "loss": 0.7}]


def read_tensorboard(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under `folder`, read back with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("key", ["loss", "kl/beta", "eval_loss", "eval_rewards/accuracies", "test_loss", "epoch",
                                 "num_tokens", "train_runtime", "evaluation"])
def test_tensorboard_tags_are_transformers(key):
    """The tag of each key is the one transformers' TensorBoardCallback writes (its rewrite_logs)."""
    from transformers.integrations.integration_utils import rewrite_logs

    from epsdpo.reporting import tensorboard_tag

    assert [tensorboard_tag(key)] == list(rewrite_logs({key: 0.0}))


def test_tensorboard_event_files_read_back_under_transformers_logging_dir(tmp_path):
    """The real tensorboard package: scalars under output_dir/runs/<Mon>DD_HH-MM-SS_<host>, transformers'
    default logging_dir, with train/ and eval/ tags."""
    import socket

    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path, ["tensorboard"], True, {})
    log.log({"step": 3, "loss": 0.69, "kl/beta": 0.1, "epoch": 0.5})
    log.log({"step": 3, "eval_loss": 0.7, "epoch": 0.5})
    log.close()
    (folder,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"[A-Z][a-z]{2}\d{2}_\d{2}-\d{2}-\d{2}_" + re.escape(socket.gethostname()), folder.name)
    scalars = read_tensorboard(folder)
    # an eval record's epoch is train/epoch, as transformers tags it
    assert scalars.keys() == {"train/loss", "train/kl/beta", "train/epoch", "eval/loss"}
    assert [(s, round(v, 6)) for s, v in scalars["train/loss"]] == [(3, 0.69)]
    assert [(s, round(v, 6)) for s, v in scalars["eval/loss"]] == [(3, 0.7)]


def test_mlflow_with_a_local_file_store_gets_every_record_and_the_settings(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for offline use
    config = TrainConfig(report_to="mlflow", run_name="offline", beta=0.25).to_dict()
    log = MetricsLog(tmp_path, "mlflow", True, config)
    log.log({"step": 1, "loss": 0.69, "kl/beta": 0.25})
    log.log({"step": 2, "loss": 0.6, "kl/beta": 0.2, "eval_rewards/accuracies": 0.75})
    log.close()
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "offline" and run.info.status == "FINISHED"
    assert run.data.params["beta"] == "0.25"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "kl/beta")]
    assert sorted(history) == [(1, 0.25), (2, 0.2)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "eval_rewards/accuracies")] == [0.75]


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (not a test dependency); its calls are checked "
                                          "against a stand-in above")
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = MetricsLog(tmp_path, "wandb", True, TrainConfig(run_name="offline").to_dict())
    log.log({"step": 1, "loss": 0.69})
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")), "no offline run was written"


def test_a_training_run_reports_what_trl_reports(tmp_path):
    """A run with report_to tensorboard: every record carries epoch and num_tokens, the run ends with
    transformers' summary, and the event file holds them under train/ and eval/ tags."""
    pytest.importorskip("tensorboard")
    from epsdpo.trainer import Trainer
    from test_trainer import config
    from tiny import tiny_llama, toy_store

    trainer = Trainer(tiny_llama(0), config(tmp_path, max_steps=2, report_to="tensorboard"), toy_store(),
                      eval_dataset=toy_store(16, seed=5))
    trainer.train()
    history = trainer.state.log_history
    assert all("epoch" in r and "num_tokens" in r for r in history)
    summary = history[-1]
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"} <= summary.keys()
    assert summary["train_samples_per_second"] == pytest.approx(16 / summary["train_runtime"], rel=1e-6)
    (folder,) = (tmp_path / "run" / "runs").iterdir()
    scalars = read_tensorboard(folder)
    assert {"train/loss", "train/kl/beta", "train/epoch", "train/num_tokens", "eval/loss", "eval/rewards/accuracies",
            "train/train_runtime", "train/train_loss"} <= scalars.keys()
    assert [step for step, _ in scalars["train/loss"]] == [1, 2] and [s for s, _ in scalars["eval/loss"]] == [2]
