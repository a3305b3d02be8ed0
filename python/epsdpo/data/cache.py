"""On-disk cache of tokenized preference data: a store file plus a small JSON report beside it.

An entry is keyed by a fingerprint of everything that decides its bytes: the source data, the
tokenizer, the chat template (and its variables), the truncation settings, and the version of
this ingestion code. Changing any of them misses the cache; nothing else can return stale data.

Layout: ``<cache dir>/<fingerprint>.epsdpo`` (the :class:`~epsdpo.PreferenceStore` file,
memory-mapped on load) and ``<cache dir>/<fingerprint>.json`` (the :class:`DataReport`). Both are
written atomically (temporary file + rename), the report last, so a reader that finds the report
finds a complete store; concurrent writers (several ranks) just overwrite one another.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from epsdpo._core import PreferenceStore, StoreFileError, __version__
from epsdpo.data.stats import DataReport

__all__ = ["DEFAULT", "fingerprint", "resolve_cache_dir", "store_path", "tokenizer_hash"]

# Bump when the ingestion rules change what a given input produces, so old entries stop matching.
INGEST_VERSION = 1
ENV_VAR = "EPSDPO_CACHE"
# Sentinel for "the default cache dir": None already means "no cache".
DEFAULT: Any = object()
_CHUNK = 1 << 20


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None | Any) -> Path | None:
    """``DEFAULT`` → ``$EPSDPO_CACHE`` or ``~/.cache/epsdpo``; ``None`` → no caching."""
    if cache_dir is None:
        return None
    if cache_dir is DEFAULT:
        env = os.environ.get(ENV_VAR)
        return Path(env).expanduser() if env else Path.home() / ".cache" / "epsdpo"
    return Path(cache_dir).expanduser()


def _hasher() -> Any:
    return hashlib.blake2b(digest_size=20)


def hash_file(path: str | os.PathLike[str]) -> str:
    """Content hash of a file (its name and timestamps do not matter)."""
    h = _hasher()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _HashSink(io.RawIOBase):
    """A write-only file that hashes what it is given, so hashing a table never copies it."""

    def __init__(self) -> None:
        self.h = _hasher()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.h.update(b)
        return memoryview(b).nbytes


def hash_arrow_table(table: Any) -> str:
    """Content hash of a pyarrow Table via its IPC stream (types, values, and column names)."""
    import pyarrow as pa

    sink = _HashSink()
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), table.schema) as writer:
        writer.write_table(table)
    return sink.h.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of the fast tokenizer's full definition (vocab, merges, normalizer, pre-tokenizer,
    post-processor, added tokens) and of its BOS/EOS choice. Truncation and padding are left out:
    transformers changes them on the backend between calls, and we never use them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer")
    if backend.truncation is not None or backend.padding is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    h = _hasher()
    # The serialization is deterministic (vocab written in id order), so hashing it as is works.
    h.update(backend.to_str().encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token]).encode())
    return h.hexdigest()


def fingerprint(**parts: Any) -> str:
    """One key for every input that decides the cached bytes (plus the code's version)."""
    payload = {"ingest_version": INGEST_VERSION, "epsdpo": __version__, **parts}
    h = _hasher()
    h.update(json.dumps(payload, sort_keys=True, ensure_ascii=False, default=repr).encode())
    return h.hexdigest()


def store_path(root: Path, key: str) -> Path:
    return root / f"{key}.epsdpo"


def report_path(root: Path, key: str) -> Path:
    return root / f"{key}.json"


def load(root: Path, key: str) -> tuple[PreferenceStore, DataReport] | None:
    """The cached entry, or None when absent or damaged (a damaged one is rebuilt, with a warning)."""
    rpath, spath = report_path(root, key), store_path(root, key)
    if not rpath.is_file() or not spath.is_file():
        return None
    try:
        report = DataReport.from_dict(json.loads(rpath.read_text(encoding="utf-8")))
        store = PreferenceStore.load(spath)
    except (OSError, ValueError, TypeError, KeyError, StoreFileError) as e:
        warnings.warn(f"ignoring a damaged cache entry {spath.name} ({e}); rebuilding it", stacklevel=3)
        return None
    if len(store) != report.num_pairs:
        warnings.warn(f"ignoring a cache entry {spath.name} whose report does not match its store; rebuilding it", stacklevel=3)
        return None
    return store, report


def save(root: Path, key: str, store: PreferenceStore, report: DataReport) -> Path:
    """Write the store, then the report (both atomically); return the store path."""
    root.mkdir(parents=True, exist_ok=True)
    spath = store_path(root, key)
    store.save(spath)
    data = report.to_dict()
    data["cache_hit"] = False
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{key}.", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
        os.replace(tmp, report_path(root, key))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return spath
