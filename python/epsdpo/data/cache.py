"""On-disk cache of tokenized preference data: a store file plus a small JSON report beside it.

An entry is keyed by a fingerprint of everything that decides its bytes: the source data, the
tokenizer, the chat template (and its variables), the truncation settings, and the version of
this ingestion code. Changing any of them misses the cache; nothing else can return stale data.

Layout: ``<cache dir>/<fingerprint>.epsdpo`` (the :class:`~epsdpo.PreferenceStore` file,
memory-mapped on load) and ``<cache dir>/<fingerprint>.json`` (the :class:`DataReport`). Both are
written atomically (temporary file + rename), the report last, so a reader that finds the report
finds a complete store; concurrent writers (several ranks) just overwrite one another.

Where: ``$EPSDPO_CACHE``, else ``$XDG_CACHE_HOME/epsdpo``, else ``~/.cache/epsdpo``
(:func:`default_cache_dir`); a ``cache_dir`` given to the loader (``prepare --cache_dir``,
``TrainConfig.dataset_cache_dir``) overrides it, and the word ``disabled`` (:data:`NO_CACHE`) in any
of those places turns caching off.

The cache never fails a load: a damaged entry is rebuilt, and a directory that cannot be written
(or read) means no caching, each with a warning. A writer killed mid-write (``kill -9``, OOM)
leaves its temporary file (``*.epsdpo-tmp<pid>*``); the next load or write removes such files once
their writer is gone (see :func:`clean_stale_temp_files`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from epsdpo._core import PreferenceStore, StoreFileError, __version__
from epsdpo.data.stats import DataReport

__all__ = [
    "DEFAULT", "NO_CACHE", "clean_stale_temp_files", "default_cache_dir", "fingerprint", "resolve_cache_dir",
    "store_path", "tokenizer_hash",
]

# Bump when the ingestion rules change what a given input produces, so old entries stop matching.
# 2: the report counts identical_after_truncation (an older entry's report would say 0).
INGEST_VERSION = 2
ENV_VAR = "EPSDPO_CACHE"
# Sentinel for "the default cache dir" (what `load_preferences` does when not told otherwise).
DEFAULT: Any = object()
# The one word that turns caching off wherever a cache directory is named by a string: `prepare
# --cache_dir`, `TrainConfig.dataset_cache_dir` (YAML or flag), `$EPSDPO_CACHE`. Not "none": the train
# flags read none/null as None, which there means the default directory.
NO_CACHE = "disabled"
# Words that read as "no cache" but would silently become a directory of that name: refused.
_LOOKS_LIKE_NO_CACHE = frozenset({"", "none", "null", "off", "false", "no"})
_CHUNK = 1 << 20
# Temporary files of both writers: the store's (Rust, `<name>.epsdpo-tmp<pid>.<unique>`) and the
# report's (`.<key>.json.epsdpo-tmp<pid>.<random>`). The pid says whose it is; the suffix keeps two
# writers of one process (threads) out of each other's file.
_TEMP_FILE = re.compile(r"\.epsdpo-tmp(\d+)(?:\.|$)")
# A temporary file whose writer process is gone is removed once it is this old, so that a writer
# on another machine sharing the directory (whose pid means nothing here) is never raced: a write
# in progress keeps touching its file. Any temporary file this old is removed regardless.
STALE_DEAD_WRITER_SECONDS = 60.0
STALE_ANY_SECONDS = 24 * 3600.0


def default_cache_dir() -> Path | None:
    """``$EPSDPO_CACHE``, else ``$XDG_CACHE_HOME/epsdpo``, else ``~/.cache/epsdpo``; None when
    ``$EPSDPO_CACHE`` is ``disabled``. An empty variable counts as unset."""
    env = os.environ.get(ENV_VAR)
    if env:
        return _named_dir(env, f"${ENV_VAR}")
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says to ignore a relative XDG_CACHE_HOME.
    base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".cache"
    return base / "epsdpo"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None | Any) -> Path | None:
    """``DEFAULT`` → :func:`default_cache_dir`; ``None`` or ``"disabled"`` → no caching; any other
    path → that directory."""
    if cache_dir is None:
        return None
    if cache_dir is DEFAULT:
        return default_cache_dir()
    return _named_dir(cache_dir, "cache_dir")


def _named_dir(value: str | os.PathLike[str], what: str) -> Path | None:
    """The directory a string or path names; None for ``disabled``."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word == NO_CACHE:
            return None
        if word in _LOOKS_LIKE_NO_CACHE:
            other = f" (./{value.strip()} for a directory of that name)" if word else ""
            raise ValueError(f"{what}={value!r} is not a directory: write {NO_CACHE!r} to turn caching off{other}")
    return Path(value).expanduser()


def hasher() -> Any:
    return hashlib.blake2b(digest_size=20)


def hash_file(path: str | os.PathLike[str]) -> str:
    """Content hash of a file (its name and timestamps do not matter)."""
    h = hasher()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _HashSink(io.RawIOBase):
    """A write-only file that hashes what it is given, so hashing a table never copies it."""

    def __init__(self) -> None:
        self.h = hasher()

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
    h = hasher()
    # The serialization is deterministic (vocab written in id order), so hashing it as is works.
    h.update(backend.to_str().encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token]).encode())
    return h.hexdigest()


def fingerprint(**parts: Any) -> str:
    """One key for every input that decides the cached bytes (plus the code's version)."""
    payload = {"ingest_version": INGEST_VERSION, "epsdpo": __version__, **parts}
    h = hasher()
    h.update(json.dumps(payload, sort_keys=True, ensure_ascii=False, default=repr).encode())
    return h.hexdigest()


def store_path(root: Path, key: str) -> Path:
    return root / f"{key}.epsdpo"


def report_path(root: Path, key: str) -> Path:
    return root / f"{key}.json"


def _process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs here (signal 0 probes without signalling)."""
    if os.name == "nt":  # os.kill would terminate the process there: leave it to the age rule
        return False
    if pid <= 0:  # 0 and negatives address process groups in kill(); never a writer's pid
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OverflowError:  # no pid is that large
        return True
    except OSError:  # PermissionError: alive, another user's; anything else: assume alive
        return False
    return False


def clean_stale_temp_files(root: Path, now: float | None = None) -> list[str]:
    """Remove the temporary files of writers killed mid-write; return their names.

    A file is stale when its writer's pid is not running here and it has not been written for
    ``STALE_DEAD_WRITER_SECONDS``, or when it has not been written for ``STALE_ANY_SECONDS``. Any
    error (a directory that cannot be listed, a file another process removed first) is ignored:
    cleaning is best effort and must never fail a load.
    """
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_FILE.search(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
            if age > STALE_ANY_SECONDS or (age > STALE_DEAD_WRITER_SECONDS and _process_gone(int(match.group(1)))):
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            continue
    return removed


def load(root: Path, key: str) -> tuple[PreferenceStore, DataReport] | None:
    """The cached entry, or None when absent or damaged (a damaged one is rebuilt, with a warning)."""
    rpath, spath = report_path(root, key), store_path(root, key)
    clean_stale_temp_files(root)
    try:
        if not rpath.is_file() or not spath.is_file():
            return None
    except OSError as e:  # e.g. a directory we may not search
        warnings.warn(f"cannot read the cache directory {root} ({e}); loading without the cache", stacklevel=3)
        return None
    try:
        data = json.loads(rpath.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"the report is a JSON {type(data).__name__}, not an object")
        report = DataReport.from_dict(data)
        store = PreferenceStore.load(spath)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError, StoreFileError) as e:
        warnings.warn(f"ignoring a damaged cache entry {spath.name} ({e}); rebuilding it", stacklevel=3)
        return None
    if len(store) != report.num_pairs:
        warnings.warn(f"ignoring a cache entry {spath.name} whose report does not match its store; rebuilding it", stacklevel=3)
        return None
    return store, report


def save(root: Path, key: str, store: PreferenceStore, report: DataReport) -> Path | None:
    """Write the store, then the report (both atomically); return the store path, or None (with
    a warning) when the cache directory cannot be written: the data is loaded either way."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_files(root)
        spath = store_path(root, key)
        store.save(spath)
        _write_report(root, key, report)
    except (OSError, StoreFileError) as e:
        warnings.warn(f"cannot write the cache entry under {root} ({e}); continuing without caching", stacklevel=3)
        return None
    return spath


def _write_report(root: Path, key: str, report: DataReport) -> None:
    data = report.to_dict()
    data["cache_hit"] = False
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{key}.json.epsdpo-tmp{os.getpid()}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
        os.replace(tmp, report_path(root, key))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
