"""Where preference rows come from: datasets objects, local files, the Hugging Face Hub.

Every source is read as batches of Python objects (a dict of column lists), and can hash its
content for the cache without being parsed. Local JSON files are parsed with the standard library
rather than Arrow, so a row whose value has the wrong type becomes a per-row error, not a failed load.
Likewise a JSON Lines line that is not a row at all (not UTF-8, not JSON, nested too deeply, not an
object, holding an integer too long for Python to convert, longer than the row byte limit) keeps its
place as an :class:`UnreadableRow`, which ingestion reports (or skips) like any other bad row. A line
over the limit is read in bounded chunks and dropped, never held whole nor parsed
(`row_byte_limit`: a 60 MB line costs a pass over its bytes, not gigabytes of parsed text).
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from epsdpo.data import cache as _cache

__all__ = [
    "COLUMNS", "FILE_SUFFIXES", "DataSourceError", "RowSource", "UnreadableRow", "STORE_SUFFIXES", "check_columns",
    "is_store_path", "load_hub_dataset", "open_source", "pick_split", "row_byte_limit",
]

COLUMNS = ("prompt", "chosen", "rejected")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
# Files that are already a tokenized PreferenceStore: `epsdpo prepare --output` (.store by convention)
# and cache entries (.epsdpo) are the same format, written by `PreferenceStore.save`.
STORE_SUFFIXES = (".store", ".epsdpo")

# The default largest raw row (row_byte_limit): generous for any text max_length tokens can come from
# (a token rarely takes more than a few bytes, even JSON-escaped), and far below what costs gigabytes.
ROW_BYTES_PER_TOKEN = 1024
MIN_ROW_BYTES = 1 << 20
ROW_BYTES_WITHOUT_MAX_LENGTH = 64 << 20
_CHUNK = 1 << 20  # how much of an oversize line is read at a time while it is skipped


def row_byte_limit(max_length: int | None, max_row_bytes: int | None = None) -> int:
    """The largest raw row read: `max_row_bytes` when given, else 1 KiB per token of `max_length`
    and at least 1 MiB, else (no max_length) 64 MiB. Text past max_length tokens is cut off in
    training anyway, so a larger row is almost surely not a preference pair but a broken file."""
    if max_row_bytes is not None:
        return max_row_bytes
    if max_length is None:
        return ROW_BYTES_WITHOUT_MAX_LENGTH
    return max(MIN_ROW_BYTES, ROW_BYTES_PER_TOKEN * max_length)


def too_large_message(size: int, limit: int, unit: str = "bytes") -> str:
    return (f"{size:,} {unit}, over the row limit of {limit:,} (max_row_bytes; by default 1 KiB per token of "
            "max_length, at least 1 MiB)")


def _max_int_digits() -> int:
    """Python's limit on the digits of an int parsed from text (0: none; Pythons before 3.10.7 have none)."""
    return getattr(sys, "get_int_max_str_digits", lambda: 0)()


class _NumberTooLong(ValueError):
    """json's parse_int met more digits than Python converts (sys.get_int_max_str_digits)."""

    def __init__(self, digits: int) -> None:
        super().__init__(f"an integer of {digits:,} digits, more than Python converts "
                         f"({_max_int_digits():,}, sys.get_int_max_str_digits)")


def _json_int(text: str) -> int:
    limit = _max_int_digits()
    if limit and len(text.lstrip("-")) > limit:
        raise _NumberTooLong(len(text.lstrip("-")))
    return int(text)


class DataSourceError(ValueError):
    """The source cannot be read: missing file, unknown suffix, missing column, unreachable hub."""


class UnreadableRow:
    """A row that could not even be parsed: it stands in every column of its row, so the rows
    after it keep their numbers (pair ids are row numbers) and ingestion turns it into a bad row
    with ``code`` and ``message``, raised or, under ``skip_invalid``, skipped and counted."""

    __slots__ = ("code", "message")

    def __init__(self, code: str, message: str) -> None:
        self.code, self.message = code, message

    def __repr__(self) -> str:
        return f"UnreadableRow({self.code!r}, {self.message!r})"


class RowSource:
    """Rows of one source, read in batches of Python objects (dict of column lists)."""

    description: str
    column_names: list[str]
    num_rows: int

    def batches(self, batch_size: int) -> Iterator[dict[str, list[Any]]]:
        raise NotImplementedError

    def content_hash(self, columns: Sequence[str]) -> str:
        raise NotImplementedError

    def locate(self, row: int) -> str | None:
        """Where row ``row`` is in the source (``"line 7"``), when that differs from its number."""
        return None


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

    def __init__(self, path: Path, max_row_bytes: int = ROW_BYTES_WITHOUT_MAX_LENGTH) -> None:
        self.path = path
        self.max_row_bytes = max_row_bytes
        self.description = path.name
        self._rows: list[dict[str, Any] | UnreadableRow] | None = None
        self._lines: list[int] | None = None
        self._parquet: Any = None
        if _is_parquet(path):
            import pyarrow.parquet as pq

            try:
                self._parquet = pq.ParquetFile(path)
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                raise DataSourceError(f"{path.name}: not a readable Parquet file ({e})") from e
            self.column_names = list(self._parquet.schema_arrow.names)
        else:
            rows, self._lines = _read_json_rows(path, max_row_bytes, limit=1000 if _is_jsonl(path) else None)
            if not _is_jsonl(path):
                self._rows = rows
            names: dict[str, None] = {}
            for row in rows[:1000]:
                if isinstance(row, dict):
                    names.update(dict.fromkeys(row))
            first_bad = next((k for k, row in enumerate(rows) if isinstance(row, UnreadableRow)), None)
            if not names and first_bad is not None:
                # No column names to check and no row to train on: say why, not "no 'chosen' column".
                where = self.locate(first_bad) or f"row {first_bad}"
                raise DataSourceError(f"{path.name}, {where}: {rows[first_bad].message} (and no readable row among the first {len(rows)})")
            self.column_names = list(names)

    def _all_rows(self) -> list[dict[str, Any] | UnreadableRow]:
        if self._rows is None:
            self._rows, self._lines = _read_json_rows(self.path, self.max_row_bytes)
        return self._rows

    def locate(self, row: int) -> str | None:
        if self._lines is None or row >= len(self._lines):
            return None
        return f"line {self._lines[row]}"

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        if self._parquet is not None:
            return int(self._parquet.metadata.num_rows)
        return len(self._all_rows())

    def batches(self, batch_size: int) -> Iterator[dict[str, list[Any]]]:
        cols = [c for c in COLUMNS if c in self.column_names]
        if self._parquet is not None:
            try:
                for batch in self._parquet.iter_batches(batch_size=batch_size, columns=cols):
                    yield batch.to_pydict()
            except (OSError, ValueError) as e:
                raise DataSourceError(f"{self.path.name}: the Parquet data cannot be read ({e})") from e
            return
        rows = self._all_rows()
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            # A row lacking a key gets None, exactly like a missing value in an Arrow column; an
            # unreadable row stands in every column.
            yield {c: [row.get(c) if isinstance(row, dict) else row for row in chunk] for c in cols}

    def content_hash(self, columns: Sequence[str]) -> str:
        return _cache.hash_file(self.path)


def _is_jsonl(path: Path) -> bool:
    return path.name.removesuffix(".gz").endswith(".jsonl")


def _is_parquet(path: Path) -> bool:
    return path.name.endswith(".parquet")


def _read_json_rows(path: Path, max_row_bytes: int,
                    limit: int | None = None) -> tuple[list[dict[str, Any] | UnreadableRow], list[int] | None]:
    """Parse with the standard library, not pyarrow: Arrow refuses a column whose type changes
    between rows, and such a row must become a per-row error, not a failed load. ``limit``
    stops a JSON Lines file after that many rows; a line over ``max_row_bytes`` is a bad row. Returns
    the rows and, for JSON Lines, the line number of each (blank lines are not rows)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            if _is_jsonl(path):
                rows: list[dict[str, Any] | UnreadableRow] = []
                lines: list[int] = []
                # Bytes, decoded line by line, so that a bad byte costs its line, not the file.
                for lineno, raw in _lines_within(f, max_row_bytes):
                    if limit is not None and len(rows) >= limit:
                        break
                    if isinstance(raw, int):  # the size of a line too long to keep
                        rows.append(UnreadableRow("row_too_large", too_large_message(raw, max_row_bytes)))
                    elif not raw.strip():
                        continue
                    else:
                        rows.append(_parse_line(raw, lineno))
                    lines.append(lineno)
                return rows, lines
            data = _parse_document(path, f.read())
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataSourceError(f"{path.name}: not a readable gzip file ({e})") from e
    if isinstance(data, dict):  # column-oriented {"prompt": [...], "chosen": [...], ...}
        lengths = {len(v) for v in data.values() if isinstance(v, list)}
        if len(lengths) != 1 or not all(isinstance(v, list) for v in data.values()):
            raise DataSourceError(f"{path.name}: a JSON object must map each column to an equally long list")
        n = lengths.pop()
        data = [{k: v[i] for k, v in data.items()} for i in range(n)]
    if not isinstance(data, list):
        raise DataSourceError(f"{path.name}: expected a JSON list of rows or an object of columns")
    return [row if isinstance(row, dict) else UnreadableRow("not_an_object", f"a JSON {_json_type(row)}, not an object") for row in data], None


def _lines_within(f: Any, max_bytes: int) -> Iterator[tuple[int, bytes | int]]:
    """Each line of a binary file with its number: its bytes, or, when it holds more than
    `max_bytes` (its newline aside), its size, counted while it is read in chunks and dropped."""
    lineno = 0
    while raw := f.readline(max_bytes + 1):
        lineno += 1
        if len(raw) <= max_bytes or raw.endswith(b"\n"):
            yield lineno, raw
            continue
        size = len(raw)
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(_CHUNK)
            size += len(raw)
        yield lineno, size - raw.endswith(b"\n")


def _parse_line(raw: bytes, lineno: int) -> dict[str, Any] | UnreadableRow:
    """One JSON Lines line as a row, or why it is none (the caller adds the file and line)."""
    try:
        # A byte-order mark may start the file (Windows editors write one).
        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        return UnreadableRow("invalid_utf8", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)")
    try:
        row = json.loads(text, parse_int=_json_int)
    except json.JSONDecodeError as e:
        return UnreadableRow("invalid_json", f"not valid JSON ({e.msg} at column {e.colno})")
    except _NumberTooLong as e:
        return UnreadableRow("number_too_long", f"holds {e}")
    except RecursionError:
        # The parser recurses per nesting level; Python's recursion limit stops it.
        return UnreadableRow("too_deep", "JSON nested too deeply to parse (over the interpreter's recursion limit)")
    if not isinstance(row, dict):
        return UnreadableRow("not_an_object", f"a JSON {_json_type(row)}, not an object")
    return row


def _parse_document(path: Path, raw: bytes) -> Any:
    """A whole .json file; any failure is the file's, named with the line where possible."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataSourceError(f"{path.name}, line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {column} of the line)") from None
    try:
        return json.loads(text, parse_int=_json_int)
    except json.JSONDecodeError as e:
        raise DataSourceError(f"{path.name}, line {e.lineno}: not valid JSON ({e.msg})") from None
    except _NumberTooLong as e:  # one document: no row to blame, so the file's error, as invalid JSON is
        raise DataSourceError(f"{path.name}: holds {e}") from None
    except RecursionError:
        raise DataSourceError(f"{path.name}: JSON nested too deeply to parse (over the interpreter's recursion limit)") from None


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def pick_split(dataset_dict: Mapping[str, Any], split: str | None, what: str) -> tuple[Any, str]:
    """The `split` of a DatasetDict (None: train, else its only split) and that split's name; `what`
    names the DatasetDict in errors."""
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


def _hub_offline_mode() -> bool:
    import datasets.config

    from epsdpo import hub

    return bool(datasets.config.HF_HUB_OFFLINE) or hub.offline_mode()


def open_source(source: Any, split: str | None, max_row_bytes: int = ROW_BYTES_WITHOUT_MAX_LENGTH) -> RowSource:
    """The rows of `source`; a JSON Lines line over `max_row_bytes` becomes a bad row unread."""
    import datasets

    if isinstance(source, datasets.Dataset):
        if split is not None:
            raise DataSourceError("split= applies to a DatasetDict or a hub id, not to a Dataset")
        return _DatasetSource(source, "Dataset")
    if isinstance(source, datasets.DatasetDict):
        ds, name = pick_split(source, split, "the DatasetDict")
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
            ds, name = pick_split(loaded, split, text)
            return _DatasetSource(ds, f"{path.name}[{name!r}]")
        return _DatasetSource(loaded, path.name)
    looks_like_file = path.name.endswith(FILE_SUFFIXES) or path.suffix != "" or os.sep in text or text.startswith(".")
    if path.is_file():
        if is_store_path(path):
            raise DataSourceError(
                f"{text} is a PreferenceStore file, already tokenized: open it with PreferenceStore.load, or train on "
                "it as it is (Trainer's dataset, or train_data:)"
            )
        if not path.name.endswith(FILE_SUFFIXES):
            raise DataSourceError(
                f"{text}: unsupported file type; preference rows come in {', '.join(FILE_SUFFIXES)} files, "
                f"tokenized stores in {' or '.join(STORE_SUFFIXES)} files (written by `epsdpo prepare` and its cache)"
            )
        if split is not None:
            raise DataSourceError("split= applies to a DatasetDict or a hub id, not to a file")
        return _FileSource(path, max_row_bytes)
    if looks_like_file and not _looks_like_hub_id(text):
        raise DataSourceError(f"{text}: no such file")
    return _DatasetSource(*load_hub_dataset(text, split))


def is_store_path(source: Any) -> bool:
    """Whether ``source`` names a PreferenceStore file by its suffix (the file need not exist)."""
    return isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(STORE_SUFFIXES)


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) \
        and not text.endswith(FILE_SUFFIXES + STORE_SUFFIXES)


def load_hub_dataset(name: str, split: str | None, config: str | None = None) -> tuple[Any, str]:
    """A hub dataset (the split's ``Dataset`` of its configuration ``config``, TRL's dataset_config)
    and its description. Offline mode loads only from the local Hugging Face cache; otherwise one
    quick request (:func:`epsdpo.hub.reachable`) comes first, so an offline machine fails in seconds,
    not after the minute of retries ``datasets`` would spend."""
    import datasets

    from epsdpo import hub

    hint = (
        "Pass a local path (.jsonl, .json, .parquet, or a save_to_disk folder) or a datasets.Dataset instead; "
        "a dataset already in the local Hugging Face cache loads with HF_HUB_OFFLINE=1."
    )
    if not _hub_offline_mode() and not hub.reachable():
        raise DataSourceError(f"{name!r} is not a local file, and the Hugging Face Hub is unreachable. {hint}")
    try:
        loaded = datasets.load_dataset(name, config, split=split)
    except (ConnectionError, OSError) as e:
        raise DataSourceError(f"could not load {name!r}: the Hugging Face Hub is unreachable or the dataset is not cached ({e}). {hint}") from e
    except Exception as e:  # DatasetNotFoundError and friends: name the id and the way out
        raise DataSourceError(f"could not load {name!r} from the Hugging Face Hub: {e}. {hint}") from e
    if isinstance(loaded, datasets.DatasetDict):
        return pick_split(loaded, split, repr(name))[0], name
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
