"""Shared test setup."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from recording_trainer import RecordingTrainer


@pytest.fixture(autouse=True, scope="session")
def _private_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Training and `epsdpo prepare` cache tokenized data by default (in `$EPSDPO_CACHE`, else
    `~/.cache/epsdpo`): tests, and the processes they start, cache in a directory of their own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EPSDPO_CACHE", str(tmp_path_factory.mktemp("epsdpo-cache")))
        yield


@pytest.fixture
def trainer(monkeypatch: pytest.MonkeyPatch) -> type[RecordingTrainer]:
    """`epsdpo train` builds a RecordingTrainer instead of training (the CLI tests read its calls)."""
    import epsdpo.trainer

    RecordingTrainer.calls = []
    monkeypatch.setattr(epsdpo.trainer, "Trainer", RecordingTrainer)
    return RecordingTrainer
