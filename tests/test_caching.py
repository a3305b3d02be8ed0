"""Where tokenized preference data is cached, and training on a store file: `load_preferences`,
`epsdpo prepare` and training all cache by default in one place, one word turns caching off, and a
cache file or a `prepare --output` file is training data."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path
from typing import Any

import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from epsdpo import PreferenceStore  # noqa: E402
from epsdpo.cli import main  # noqa: E402
from epsdpo.config import TrainConfig  # noqa: E402
from epsdpo.data import DataSourceError, load_preferences  # noqa: E402
from epsdpo.data.cache import default_cache_dir, resolve_cache_dir  # noqa: E402
from epsdpo.feed import as_store, make_collator  # noqa: E402
from epsdpo.trainer import Trainer  # noqa: E402
from test_data import build_tokenizer, std_rows, store_rows  # noqa: E402
from tiny import tiny_llama  # noqa: E402


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh home and no cache variables, so the default place is decided by the code under test."""
    monkeypatch.delenv("EPSDPO_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer()


@pytest.fixture(scope="module")
def tok_dir(tok: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in std_rows(12)))
    return path


def entries(root: Path) -> list[Path]:
    return sorted(root.rglob("*.epsdpo")) if root.exists() else []


def train_config(tmp_path: Path, **overrides: Any) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=1, warmup_ratio=0.0,
                max_length=64, max_prompt_length=32, progress=False, plots=False, report_to="none")
    return TrainConfig(**{**base, **overrides})


# --- where -----------------------------------------------------------------------------------


def test_the_default_place_follows_the_documented_order(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_cache_dir() == home / ".cache" / "epsdpo"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec ignores a relative one
    assert default_cache_dir() == home / ".cache" / "epsdpo"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "epsdpo"
    monkeypatch.setenv("EPSDPO_CACHE", "")  # empty counts as unset
    assert default_cache_dir() == tmp_path / "xdg" / "epsdpo"
    monkeypatch.setenv("EPSDPO_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("EPSDPO_CACHE", "disabled")
    assert default_cache_dir() is None


def test_disabled_turns_caching_off_and_lookalikes_are_refused(tmp_path: Path) -> None:
    assert resolve_cache_dir(None) is None
    assert resolve_cache_dir("disabled") is None and resolve_cache_dir(" Disabled ") is None
    for word in ("none", "None", "null", "off", "false", "no", ""):
        with pytest.raises(ValueError, match="'disabled' to turn caching off") as err:
            resolve_cache_dir(word)
        assert repr(word) in str(err.value)
    assert resolve_cache_dir("./none") == Path("none")  # a directory of that name, spelled as one
    assert resolve_cache_dir(tmp_path / "none") == tmp_path / "none"


def test_load_preferences_caches_in_the_default_place(home: Path, tok: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ds = datasets.Dataset.from_list(std_rows(4))
    _, report = load_preferences(ds, tok, progress=False)
    assert Path(report.cache_path).parent == tmp_path / "xdg" / "epsdpo"
    assert load_preferences(ds, tok, progress=False)[1].cache_hit
    assert f"cached store: {report.cache_path}" in str(report)
    _, report = load_preferences(ds, tok, progress=False, cache_dir="disabled")
    assert report.cache_path is None and report.fingerprint is None
    with pytest.raises(ValueError, match="cache_dir='none'"):
        load_preferences(ds, tok, progress=False, cache_dir="none")
    assert not (Path.cwd() / "none").exists()


@pytest.mark.parametrize("setting", [None, "disabled", "elsewhere"])
def test_training_caches_in_the_default_place_unless_told(setting: str | None, home: Path, tok: Any,
                                                          tmp_path: Path) -> None:
    if setting == "elsewhere":
        setting = str(tmp_path / "elsewhere")
    config = train_config(tmp_path, dataset_cache_dir=setting)
    ds = datasets.Dataset.from_list(std_rows(6))
    store, _ = as_store(ds, config, tok, make_collator(config, tok), progress=False)
    default = entries(home / ".cache" / "epsdpo")
    if setting is None:
        assert len(default) == 1
        assert store_rows(PreferenceStore.load(default[0])) == store_rows(store)
        assert as_store(ds, config, tok, make_collator(config, tok), progress=False)[0].is_memory_mapped  # a hit
    elif setting == "disabled":
        assert default == [] and entries(tmp_path) == []
    else:
        assert default == [] and len(entries(Path(setting))) == 1


# --- epsdpo prepare --------------------------------------------------------------------------


def test_prepare_caches_by_default_and_names_the_file(home: Path, pairs: Path, tok_dir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", str(pairs), "--tokenizer", str(tok_dir)]) == 0
    (cached,) = entries(home / ".cache" / "epsdpo")
    assert f"cached store: {cached}" in capsys.readouterr().out
    assert main(["prepare", str(pairs), "--tokenizer", str(tok_dir)]) == 0
    assert "[cache hit]" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_a_store_prepared_with_the_runs_truncation_is_the_runs_cache_hit(mode: str, home: Path, pairs: Path,
                                                                         tok: Any, tok_dir: Path,
                                                                         tmp_path: Path) -> None:
    assert main(["prepare", str(pairs), "--tokenizer", str(tok_dir), "--max_length", "64", "--max_prompt_length", "2",
                 "--prompt_truncation_mode", mode]) == 0
    config = train_config(tmp_path, max_prompt_length=2, prompt_truncation_mode=mode)
    store, _ = as_store(str(pairs), config, tok, make_collator(config, tok), progress=False)
    assert store.is_memory_mapped, "training missed the entry epsdpo prepare wrote for the same truncation"


def test_prepare_cache_dir_disabled_and_a_lookalike(home: Path, pairs: Path, tok_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", str(pairs), "--tokenizer", str(tok_dir), "--cache_dir", "disabled"]) == 0
    assert "cached store" not in capsys.readouterr().out
    assert entries(tmp_path) == []
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", str(pairs), "--tokenizer", str(tok_dir), "--cache-dir", "none"])
    assert exit_.value.code == 2
    assert "argument --cache_dir: cache_dir='none' is not a directory" in capsys.readouterr().err


def test_prepare_says_in_one_line_what_is_wrong_with_the_data(home: Path, tok_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "pairs.csv"
    bad.write_text("prompt,chosen,rejected\n")
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", str(bad), "--tokenizer", str(tok_dir)])
    assert str(exit_.value.code).startswith(f"epsdpo prepare: {bad}: unsupported file type")


# --- store files as training data ------------------------------------------------------------


def test_a_cache_file_and_a_prepared_store_are_one_format_and_both_train(home: Path, pairs: Path, tok: Any,
                                                                        tok_dir: Path, tmp_path: Path) -> None:
    prepared = tmp_path / "pairs.store"
    assert main(["prepare", str(pairs), "--tokenizer", str(tok_dir), "--output", str(prepared)]) == 0
    (cached,) = entries(home / ".cache" / "epsdpo")
    assert filecmp.cmp(cached, prepared, shallow=False), "the cache entry and the --output file differ"
    expected = store_rows(load_preferences(pairs, tok, cache_dir=None, progress=False)[0])
    config = train_config(tmp_path)
    for path in (cached, prepared, str(cached)):
        store, _ = as_store(path, config, None, make_collator(config, tok), progress=False)
        assert store.is_memory_mapped and store_rows(store) == expected, path
    trainer = Trainer(tiny_llama(0, vocab=len(tok)), config, str(cached))
    trainer.train()
    assert trainer.state.global_step == 1


def test_a_file_that_is_neither_data_nor_a_store_is_named(tmp_path: Path, tok: Any) -> None:
    config = train_config(tmp_path)
    collator = make_collator(config, tok)
    other = tmp_path / "pairs.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(DataSourceError) as err:
        as_store(str(other), config, tok, collator, progress=False)
    assert str(other) in str(err.value)
    assert all(suffix in str(err.value) for suffix in (".jsonl", ".parquet", ".store", ".epsdpo"))
    missing = tmp_path / "gone.epsdpo"
    with pytest.raises(FileNotFoundError, match="gone.epsdpo"):
        as_store(str(missing), config, tok, collator, progress=False)


def test_load_preferences_points_a_store_file_to_its_readers(tmp_path: Path, tok: Any) -> None:
    store, _ = load_preferences(datasets.Dataset.from_list(std_rows(3)), tok, cache_dir=None, progress=False)
    path = tmp_path / "pairs.store"
    store.save(path)
    with pytest.raises(DataSourceError, match=r"pairs\.store is a PreferenceStore file.*PreferenceStore\.load"):
        load_preferences(path, tok, cache_dir=None, progress=False)
    with pytest.raises(DataSourceError, match=r"missing\.epsdpo: no such file"):  # not a hub id
        load_preferences(tmp_path / "missing.epsdpo", tok, cache_dir=None, progress=False)
