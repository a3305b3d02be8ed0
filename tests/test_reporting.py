"""report_to: each logging backend through its own library's calls (recorded by stand-in modules, since
none of the libraries is a test dependency), metrics.jsonl always, and a missing package named."""

from __future__ import annotations

import json
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


def test_tensorboard_gets_every_record_through_torchs_summary_writer(tmp_path, monkeypatch):
    """torch's SummaryWriter, replaced by a recorder: the tensorboard package is not a test dependency."""
    calls: list = []

    class RecordingWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, key, value, step):
            calls.append(("add_scalar", key, value, step))

        def close(self):
            calls.append(("close",))

    fake_library("tensorboard", [], monkeypatch)
    writer_module = types.ModuleType("torch.utils.tensorboard")
    writer_module.SummaryWriter = RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", writer_module)
    log = MetricsLog(tmp_path, ["tensorboard"], True, {})
    log.log({"step": 3, "loss": 0.69, "kl/beta": 0.1})
    log.close()
    assert calls == [("init", str(tmp_path / "tensorboard")), ("add_scalar", "loss", 0.69, 3),
                     ("add_scalar", "kl/beta", 0.1, 3), ("close",)]
