"""Where preference rows come from: datasets objects, local files, the Hugging Face Hub.

Every source is read as batches of Python objects (a dict of column lists), and can hash its
content for the cache without being parsed. Local JSON files are parsed with the standard library
rather than Arrow, so a row whose value has the wrong type becomes a per-row error, not a failed load.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from epsdpo.data import cache as _cache

__all__ = ["COLUMNS", "FILE_SUFFIXES", "DataSourceError", "RowSource", "check_columns", "open_source"]

COLUMNS = ("prompt", "chosen", "rejected")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


class DataSourceError(ValueError):
    """The source cannot be read: missing file, unknown suffix, missing column, unreachable hub."""


class RowSource:
    """Rows of one source, read in batches of Python objects (dict of column lists)."""

    description: str
    column_names: list[str]
    num_rows: int

    def batches(self, batch_size: int) -> Iterator[dict[str, list[Any]]]:
        raise NotImplementedError

    def content_hash(self, columns: Sequence[str]) -> str:
        raise NotImplementedError


class _DatasetSource(RowSource):
    def __init__(self, dataset: Any, description: str) -> None:
        self.dataset = dataset
        self.description = description
        self.column_names = list(dataset.column_names)
        self.num_rows = len(dataset)

    def batches(self, batch_size: int) -> Iterator[dict[str, list[Any]]]:
        cols = [c for c in COLUMNS if c in self.column_names]
        # Only the pair columns are converted to Python objects; others (scores, metadata) cost nothing.
        yield from self.dataset.select_columns(cols).with_format(None).iter(batch_size=batch_size)

    def content_hash(self, columns: Sequence[str]) -> str:
        return _cache.hash_arrow_table(self.dataset.select_columns(list(columns)).with_format("arrow")[:])


class _FileSource(RowSource):
    """A local JSON Lines / JSON / Parquet file. A cache hit only needs its column names and its
    bytes' hash, so rows are parsed on first use (for JSON Lines, the names come from a peek)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = path.name
        self._rows: list[dict[str, Any]] | None = None
        self._parquet: Any = None
        if _is_parquet(path):
            import pyarrow.parquet as pq

            self._parquet = pq.ParquetFile(path)
            self.column_names = list(self._parquet.schema_arrow.names)
        else:
            rows = _read_json_rows(path, limit=1000 if _is_jsonl(path) else None)
            if not _is_jsonl(path):
                self._rows = rows
            names: dict[str, None] = {}
            for row in rows[:1000]:
                names.update(dict.fromkeys(row))
            self.column_names = list(names)

    def _all_rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = _read_json_rows(self.path)
        return self._rows

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        if self._parquet is not None:
            return int(self._parquet.metadata.num_rows)
        return len(self._all_rows())

    def batches(self, batch_size: int) -> Iterator[dict[str, list[Any]]]:
        cols = [c for c in COLUMNS if c in self.column_names]
        if self._parquet is not None:
            for batch in self._parquet.iter_batches(batch_size=batch_size, columns=cols):
                yield batch.to_pydict()
            return
        rows = self._all_rows()
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            # A row lacking a key gets None, exactly like a missing value in an Arrow column.
            yield {c: [row.get(c) for row in chunk] for c in cols}

    def content_hash(self, columns: Sequence[str]) -> str:
        return _cache.hash_file(self.path)


def _is_jsonl(path: Path) -> bool:
    return path.name.removesuffix(".gz").endswith(".jsonl")


def _is_parquet(path: Path) -> bool:
    return path.name.endswith(".parquet")


def _read_json_rows(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Parse with the standard library, not pyarrow: Arrow refuses a column whose type changes
    between rows, and such a row must become a per-row error, not a failed load. ``limit``
    stops a JSON Lines file after that many rows."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if _is_jsonl(path):
            rows = []
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(rows) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataSourceError(f"{path.name}, line {lineno}: not valid JSON ({e.msg})") from None
        else:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataSourceError(f"{path.name}: not valid JSON ({e.msg}, line {e.lineno})") from None
            if isinstance(data, dict):  # column-oriented {"prompt": [...], "chosen": [...], ...}
                lengths = {len(v) for v in data.values() if isinstance(v, list)}
                if len(lengths) != 1 or not all(isinstance(v, list) for v in data.values()):
                    raise DataSourceError(f"{path.name}: a JSON object must map each column to an equally long list")
                n = lengths.pop()
                data = [{k: v[i] for k, v in data.items()} for i in range(n)]
            if not isinstance(data, list):
                raise DataSourceError(f"{path.name}: expected a JSON list of rows or an object of columns")
            rows = data
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataSourceError(f"{path.name}: row {i} is a {type(row).__name__}, not a JSON object")
    return rows


def _pick_split(dataset_dict: Mapping[str, Any], split: str | None, what: str) -> tuple[Any, str]:
    names = list(dataset_dict.keys())
    if split is None:
        if "train" in dataset_dict:
            split = "train"
        elif len(names) == 1:
            split = names[0]
        else:
            raise DataSourceError(f"{what} has splits {names}; choose one with split=...")
    if split not in dataset_dict:
        raise DataSourceError(f"{what} has no split {split!r}; it has {names}")
    return dataset_dict[split], split


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connect to the hub endpoint, so offline machines fail in seconds, not after the
    minute of retries ``datasets`` would spend."""
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_offline_mode() -> bool:
    import datasets.config
    from huggingface_hub import constants

    return bool(datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE)


def open_source(source: Any, split: str | None) -> RowSource:
    import datasets

    if isinstance(source, datasets.Dataset):
        if split is not None:
            raise DataSourceError("split= applies to a DatasetDict or a hub id, not to a Dataset")
        return _DatasetSource(source, "Dataset")
    if isinstance(source, datasets.DatasetDict):
        ds, name = _pick_split(source, split, "the DatasetDict")
        return _DatasetSource(ds, f"DatasetDict[{name!r}]")
    if isinstance(source, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataSourceError("streaming datasets are not supported: load the dataset without streaming=True")
    if not isinstance(source, (str, os.PathLike)):
        raise DataSourceError(
            f"source must be a datasets.Dataset, a DatasetDict, a local file path or a hub id, got {type(source).__name__}"
        )
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataSourceError(f"{text} is a folder but not one written by datasets' save_to_disk") from e
        if isinstance(loaded, datasets.DatasetDict):
            ds, name = _pick_split(loaded, split, text)
            return _DatasetSource(ds, f"{path.name}[{name!r}]")
        return _DatasetSource(loaded, path.name)
    looks_like_file = path.name.endswith(FILE_SUFFIXES) or path.suffix != "" or os.sep in text or text.startswith(".")
    if path.is_file():
        if not path.name.endswith(FILE_SUFFIXES):
            raise DataSourceError(f"{text}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")
        if split is not None:
            raise DataSourceError("split= applies to a DatasetDict or a hub id, not to a file")
        return _FileSource(path)
    if looks_like_file and not _looks_like_hub_id(text):
        raise DataSourceError(f"{text}: no such file")
    return _DatasetSource(*_load_hub(text, split))


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and not text.endswith(FILE_SUFFIXES)


def _load_hub(name: str, split: str | None) -> tuple[Any, str]:
    import datasets

    hint = (
        "Pass a local path (.jsonl, .json, .parquet, or a save_to_disk folder) or a datasets.Dataset instead; "
        "a dataset already in the local Hugging Face cache loads with HF_HUB_OFFLINE=1."
    )
    if not _hub_offline_mode() and not _hub_reachable():
        raise DataSourceError(f"{name!r} is not a local file, and the Hugging Face Hub is unreachable. {hint}")
    try:
        loaded = datasets.load_dataset(name, split=split)
    except (ConnectionError, OSError) as e:
        raise DataSourceError(f"could not load {name!r}: the Hugging Face Hub is unreachable or the dataset is not cached ({e}). {hint}") from e
    except Exception as e:  # DatasetNotFoundError and friends: name the id and the way out
        raise DataSourceError(f"could not load {name!r} from the Hugging Face Hub: {e}. {hint}") from e
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, split, repr(name))[0], name
    return loaded, f"{name}[{split!r}]"


def check_columns(source: RowSource) -> bool:
    """Return whether the prompt is implicit; a column missing from the whole source is a
    source error (no row could be valid), not a per-row one."""
    missing = [c for c in ("chosen", "rejected") if c not in source.column_names]
    if missing:
        raise DataSourceError(
            f"{source.description} has no {' or '.join(repr(c) for c in missing)} column (columns: {source.column_names}); "
            "expected 'prompt', 'chosen', 'rejected' (or 'chosen' and 'rejected' with an implicit prompt)"
        )
    return "prompt" not in source.column_names
