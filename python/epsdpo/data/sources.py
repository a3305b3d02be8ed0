"""Where preference rows come from: datasets objects, local files and folders, Python iterables, the Hub.

Every source is read as batches of Python objects (a dict of column lists), one batch at a time, so
what a source costs in memory is one batch, not the dataset: a JSON Lines file is read line by line, a
Parquet file row group by row group, a ``datasets.IterableDataset`` or a generator row by row. Each
source hashes its content for the cache: files and Arrow tables without being parsed, a list of rows
up front, and a stream (an ``IterableDataset``, a generator) as it is read, since it can be read only
once (`RowSource.hashed_while_read`). Local JSON files are parsed with the standard library
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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

from epsdpo.data import cache as _cache

__all__ = [
    "COLUMNS", "FILE_SUFFIXES", "DataSourceError", "FolderSplit", "RowSource", "UnreadableRow", "STORE_SUFFIXES",
    "check_columns", "is_store_path", "load_hub_dataset", "open_source", "pick_split", "row_byte_limit",
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
# Rows read ahead to learn a stream's columns (the union of their keys, as for a JSON Lines file).
PEEK_ROWS = 1000


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
    # None: a stream, whose rows are counted as they are read.
    num_rows: int | None
    # Whether `content_hash` is known only once `batches` has been read to the end (a stream read
    # once); else it is known before any row is parsed, and a cache hit skips the reading.
    hashed_while_read = False

    def batches(self, batch_size: int) -> Iterator[dict[str, list[Any]]]:
        raise NotImplementedError

    def content_hash(self, columns: Sequence[str]) -> str:
        raise NotImplementedError

    def locate(self, row: int) -> str | None:
        """Where row ``row`` of the latest batch is in the source (``"line 7"``), when that differs
        from its number. Only the latest batch's rows are remembered: errors are raised for it."""
        return None


def _as_columns(rows: Sequence[Any], cols: Sequence[str]) -> dict[str, list[Any]]:
    """Rows as a dict of column lists. A row lacking a key gets None, exactly like a missing value
    in an Arrow column; an unreadable row stands in every column."""
    return {c: [row.get(c) if isinstance(row, Mapping) else row for row in rows] for c in cols}


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


class _RowHash:
    """Content hash of rows given one at a time: each row's pair columns as canonical JSON, so a
    list and a generator of the same rows hash the same. A value JSON cannot write is hashed by its
    type and repr (such a value is a bad row anyway)."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self.h = _cache.hasher()
        self.h.update(json.dumps(self.columns).encode())

    def update(self, rows: Iterable[Any]) -> None:
        for row in rows:
            values = [row.get(c) for c in self.columns] if isinstance(row, Mapping) else [_unhashable(row)]
            self.h.update(json.dumps(values, sort_keys=True, ensure_ascii=False, default=_unhashable).encode("utf-8", "surrogatepass"))
            self.h.update(b"\n")

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _unhashable(value: Any) -> str:
    return f"<{type(value).__module__}.{type(value).__qualname__}> {value!r}"


class _IterableSource(RowSource):
    """Rows from a Python iterable of row mappings (a list, a generator, any iterator) or from a
    ``datasets.IterableDataset``, read once, row by row. The columns are the keys of the first
    `PEEK_ROWS` rows, which are read ahead and kept until their turn. A list is hashed up front (it
    can be read twice); anything else while it is read."""

    def __init__(self, rows: Iterable[Any], description: str) -> None:
        self.description = description
        self._list = rows if isinstance(rows, (list, tuple)) else None
        self.num_rows = len(self._list) if self._list is not None else None
        self.hashed_while_read = self._list is None
        self._rest: Iterator[Any] = iter(rows)
        self._head = list(islice(self._rest, PEEK_ROWS))
        self._hash: _RowHash | None = None
        self._read = False
        names: dict[str, None] = {}
        for row in self._head:
            if isinstance(row, Mapping):
                names.update(dict.fromkeys(k for k in row if isinstance(k, str)))
        if not self._head:
            raise DataSourceError(f"{description}: no preference pairs to train on (the source has no rows)")
        if not names:
            raise DataSourceError(f"{description}: rows must be mappings of column names to values (a dict per row); "
                                  f"the first is a {type(self._head[0]).__name__}")
        self.column_names = list(names)

    def batches(self, batch_size: int) -> Iterator[dict[str, list[Any]]]:
        if self._read:
            raise DataSourceError(f"{self.description} was already read: a stream can be read once")
        self._read = True
        cols = [c for c in COLUMNS if c in self.column_names]
        rows = chain(self._head, self._rest)
        self._head = []  # the rows read ahead are freed with their batch
        if self.hashed_while_read:
            self._hash = _RowHash(cols)
        while chunk := list(islice(rows, batch_size)):
            if self._hash is not None:
                self._hash.update(chunk)
            yield _as_columns(chunk, cols)

    def content_hash(self, columns: Sequence[str]) -> str:
        if self._list is not None:
            digest = _RowHash(columns)
            digest.update(self._list)
            return digest.hexdigest()
        if self._hash is None or self._hash.columns != list(columns):
            raise RuntimeError("a stream's content hash is known once it has been read, for the columns read")
        return self._hash.hexdigest()


class _FileSource(RowSource):
    """A local JSON Lines / JSON / Parquet file. A cache hit only needs its column names and its
    bytes' hash, so rows are parsed on first use (for JSON Lines, the names come from a peek). A
    JSON Lines file is read line by line and a Parquet file row group by row group; a JSON document
    (one list or object) is parsed whole, being one value."""

    def __init__(self, path: Path, max_row_bytes: int = ROW_BYTES_WITHOUT_MAX_LENGTH, name: str | None = None) -> None:
        self.path = path
        self.max_row_bytes = max_row_bytes
        self.description = name or path.name
        self._rows: list[dict[str, Any] | UnreadableRow] | None = None
        # (first row, line of each row) of the latest batch read, for `locate`.
        self._window: tuple[int, list[int]] = (0, [])
        self._parquet: Any = None
        if _is_parquet(path):
            import pyarrow.parquet as pq

            try:
                self._parquet = pq.ParquetFile(path)
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                raise DataSourceError(f"{self.description}: not a readable Parquet file ({e})") from e
            self.column_names = list(self._parquet.schema_arrow.names)
            self.num_rows = int(self._parquet.metadata.num_rows)
        else:
            if _is_jsonl(path):
                peeked = list(islice(_jsonl_rows(path, max_row_bytes, self.description), PEEK_ROWS))
                rows = [row for _, row in peeked]
                self._window = (0, [line for line, _ in peeked])
                self.num_rows = None
            else:
                rows = self._rows = _read_json_document(path, self.description)
                self.num_rows = len(rows)
            names: dict[str, None] = {}
            for row in rows[:PEEK_ROWS]:
                if isinstance(row, dict):
                    names.update(dict.fromkeys(row))
            first_bad = next((k for k, row in enumerate(rows) if isinstance(row, UnreadableRow)), None)
            if not names and first_bad is not None:
                # No column names to check and no row to train on: say why, not "no 'chosen' column".
                where = self.locate(first_bad) or f"row {first_bad}"
                raise DataSourceError(f"{self.description}, {where}: {rows[first_bad].message} (and no readable row among the first {len(rows)})")
            self.column_names = list(names)

    def locate(self, row: int) -> str | None:
        first, lines = self._window
        if not first <= row < first + len(lines):
            return None
        return f"line {lines[row - first]}"

    def batches(self, batch_size: int) -> Iterator[dict[str, list[Any]]]:
        cols = [c for c in COLUMNS if c in self.column_names]
        if self._parquet is not None:
            try:
                for batch in self._parquet.iter_batches(batch_size=batch_size, columns=cols):
                    yield batch.to_pydict()
            except (OSError, ValueError) as e:
                raise DataSourceError(f"{self.description}: the Parquet data cannot be read ({e})") from e
            return
        if self._rows is not None:
            for start in range(0, len(self._rows), batch_size):
                yield _as_columns(self._rows[start : start + batch_size], cols)
            return
        numbered = _jsonl_rows(self.path, self.max_row_bytes, self.description)
        first = 0
        while chunk := list(islice(numbered, batch_size)):
            self._window = (first, [line for line, _ in chunk])
            first += len(chunk)
            yield _as_columns([row for _, row in chunk], cols)

    def content_hash(self, columns: Sequence[str]) -> str:
        return _cache.hash_file(self.path)


@dataclass(frozen=True)
class FolderSplit:
    """A split of a dataset folder, named apart from the folder: what `epsdpo train`'s train_split /
    eval_split of a folder hand to :func:`open_source`, which reads it as ``open_source(folder, split)``."""

    folder: str | os.PathLike[str]
    split: str | None


class _FilesSource(RowSource):
    """One split of a folder of data files (``train.jsonl``, ``data/train-00000-of-00002.parquet``,
    ...), its files read one after the other, as one source: row numbers run on across them."""

    def __init__(self, parts: list[_FileSource], description: str) -> None:
        self.parts = parts
        self.description = description
        names: dict[str, None] = {}
        for part in parts:
            names.update(dict.fromkeys(part.column_names))
        self.column_names = list(names)
        counts = [part.num_rows for part in parts]
        self.num_rows = None if None in counts else sum(counts)  # type: ignore[arg-type]
        self._current: tuple[int, _FileSource] = (0, parts[0])

    def batches(self, batch_size: int) -> Iterator[dict[str, list[Any]]]:
        cols = [c for c in COLUMNS if c in self.column_names]
        first = 0
        for part in self.parts:
            self._current = (first, part)
            for batch in part.batches(batch_size):
                n = len(next(iter(batch.values()))) if batch else 0
                # A column one file lacks is missing in each of its rows, as in an Arrow table of them all.
                yield {c: batch.get(c, [None] * n) for c in cols}
                first += n

    def locate(self, row: int) -> str | None:
        first, part = self._current
        return f"{part.description}, {part.locate(row - first) or f'its row {row - first}'}"

    def content_hash(self, columns: Sequence[str]) -> str:
        h = _cache.hasher()
        for part in self.parts:
            h.update(json.dumps([part.description, part.content_hash(columns)]).encode())
        return h.hexdigest()


def _is_jsonl(path: Path) -> bool:
    return path.name.removesuffix(".gz").endswith(".jsonl")


def _is_parquet(path: Path) -> bool:
    return path.name.endswith(".parquet")


def _jsonl_rows(path: Path, max_row_bytes: int, name: str) -> Iterator[tuple[int, dict[str, Any] | UnreadableRow]]:
    """Each row of a JSON Lines file with its line number, read line by line. Parsed with the standard
    library, not pyarrow: Arrow refuses a column whose type changes between rows, and such a row must
    become a per-row error, not a failed load. A line over ``max_row_bytes`` is a bad row; blank lines
    are not rows."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            # Bytes, decoded line by line, so that a bad byte costs its line, not the file.
            for lineno, raw in _lines_within(f, max_row_bytes):
                if isinstance(raw, int):  # the size of a line too long to keep
                    yield lineno, UnreadableRow("row_too_large", too_large_message(raw, max_row_bytes))
                elif raw.strip():
                    yield lineno, _parse_line(raw, lineno)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataSourceError(f"{name}: not a readable gzip file ({e})") from e


def _read_json_document(path: Path, name: str) -> list[dict[str, Any] | UnreadableRow]:
    """The rows of a JSON document: a list of rows or an object of columns."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = _parse_document(path, f.read())
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataSourceError(f"{name}: not a readable gzip file ({e})") from e
    if isinstance(data, dict):  # column-oriented {"prompt": [...], "chosen": [...], ...}
        lengths = {len(v) for v in data.values() if isinstance(v, list)}
        if len(lengths) != 1 or not all(isinstance(v, list) for v in data.values()):
            raise DataSourceError(f"{name}: a JSON object must map each column to an equally long list")
        n = lengths.pop()
        data = [{k: v[i] for k, v in data.items()} for i in range(n)]
    if not isinstance(data, list):
        raise DataSourceError(f"{name}: expected a JSON list of rows or an object of columns")
    return [row if isinstance(row, dict) else UnreadableRow("not_an_object", f"a JSON {_json_type(row)}, not an object") for row in data]


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

    if isinstance(source, FolderSplit):
        if split is not None and source.split is not None and split != source.split:
            raise DataSourceError(f"{os.fspath(source.folder)}: two splits asked for ({source.split!r} and {split!r})")
        return open_source(source.folder, source.split if source.split is not None else split, max_row_bytes)
    if isinstance(source, datasets.Dataset):
        if split is not None:
            raise DataSourceError("split= applies to a DatasetDict or a hub id, not to a Dataset")
        return _DatasetSource(source, "Dataset")
    if isinstance(source, datasets.DatasetDict):
        ds, name = pick_split(source, split, "the DatasetDict")
        return _DatasetSource(ds, f"DatasetDict[{name!r}]")
    if isinstance(source, datasets.IterableDatasetDict):
        ds, name = pick_split(source, split, "the IterableDatasetDict")
        return _iterable_dataset_source(ds, f"IterableDatasetDict[{name!r}]")
    if isinstance(source, datasets.IterableDataset):
        if split is not None:
            raise DataSourceError("split= applies to an IterableDatasetDict or a hub id, not to an IterableDataset")
        return _iterable_dataset_source(source, "IterableDataset")
    if not isinstance(source, (str, os.PathLike)):
        if isinstance(source, (bytes, bytearray, Mapping)) or not isinstance(source, Iterable):
            raise DataSourceError(
                "source must be a datasets.Dataset, a DatasetDict, an IterableDataset, an iterable of row dicts (a list, "
                f"a generator), a local file or folder path or a hub id, got {type(source).__name__}"
            )
        if split is not None:
            raise DataSourceError("split= applies to a DatasetDict or a hub id, not to an iterable of rows")
        what = "list of rows" if isinstance(source, (list, tuple)) else f"rows of a {type(source).__name__}"
        return _IterableSource(source, what)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            # Not written by save_to_disk: a folder of data files, as datasets.load_dataset(folder) reads one.
            return _folder_source(path, text, split, max_row_bytes)
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


def _iterable_dataset_source(dataset: Any, description: str) -> RowSource:
    """A streaming dataset, read row by row; only its pair columns are decoded when it knows its columns."""
    names = dataset.column_names
    if names is not None:
        dataset = dataset.select_columns([c for c in COLUMNS if c in names])
    return _IterableSource(dataset.with_format(None), description)


def _folder_source(path: Path, text: str, split: str | None, max_row_bytes: int) -> RowSource:
    """`split` of a folder of data files, the files of each split found by datasets' own rules (a
    ``train``/``test``/``validation`` keyword in the file or folder name, ``data/train-00000-of-00002``
    shards, or every file as ``train``); each file is then read as a local file is, one at a time."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        splits = DataFilesDict.from_local_or_remote(get_data_patterns(str(path)), base_path=str(path))
    except EmptyDatasetError:
        found = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        raise DataSourceError(
            f"{text} is a folder but neither one written by datasets' save_to_disk nor one of data files "
            f"({', '.join(FILE_SUFFIXES)}); it holds {_listing(found)}") from None
    files = {str(name): [Path(f) for f in found] for name, found in splits.items()}

    def named(paths: list[Path]) -> list[str]:
        return [p.relative_to(path).as_posix() for p in paths]

    owners: dict[Path, list[str]] = {}
    for name, paths in files.items():
        for p in paths:
            owners.setdefault(p, []).append(name)
    shared = {p: names for p, names in owners.items() if len(names) > 1}
    if shared:
        p, names = next(iter(shared.items()))
        raise DataSourceError(f"{text}: the file {named([p])[0]} belongs to the splits {names} by its name; rename it "
                              "so that one split keyword names it")
    chosen, name = pick_split(files, split, f"the folder {text} (splits by file name: "
                              + "; ".join(f"{n}: {_listing(named(ps))}" for n, ps in files.items()) + ")")
    unsupported = [p for p in chosen if not p.name.endswith(FILE_SUFFIXES)]
    if unsupported:
        raise DataSourceError(f"{text}: split {name!r} has files of no supported type: {_listing(named(unsupported))} "
                              f"(preference rows come in {', '.join(FILE_SUFFIXES)} files)")
    kinds = {"parquet" if _is_parquet(p) else "json" for p in chosen}
    if len(kinds) > 1:
        raise DataSourceError(f"{text}: split {name!r} mixes Parquet and JSON files ({_listing(named(chosen))}); "
                              "datasets reads one format per split, and so does epsdpo")
    parts = [_FileSource(p, max_row_bytes, name=os.path.join(text, rel)) for p, rel in zip(chosen, named(chosen))]
    return _FilesSource(parts, f"{path.name}[{name!r}]")


def _listing(names: list[str], shown: int = 6) -> str:
    if not names:
        return "no files"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


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
