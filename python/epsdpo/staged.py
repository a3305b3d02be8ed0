"""Outputs that appear whole or not at all, as checkpoints do: a folder is written under a hidden
staging name and renamed into place; a file is written to a hidden temporary name beside it and
renamed over the old one. A process killed midway leaves the earlier output (or none) and a hidden
leftover that the next write of the same output removes: never a `final/` without its tokenizer or
model card, nor a truncated `beta_ledger.npz`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO


def staging_folder(path: Path) -> Path:
    """Where folder `path` is written before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp")


def write_folder(path: Path, writer: Callable[[Path], None]) -> None:
    """Call `writer` on an empty staging folder, then put the finished folder at `path`, replacing
    an earlier one: the old folder is renamed away before the new one is renamed in, so `path` is
    always the old folder, the new one, or (between the two renames) absent; never a mix."""
    staging = staging_folder(path)
    shutil.rmtree(staging, ignore_errors=True)  # a killed writer's leftover is never finished
    staging.mkdir(parents=True)
    try:
        writer(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        trash = path.with_name(f".{path.name}.trash")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        os.replace(staging, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, path)


def replace_file(path: Path, writer: Callable[[IO[bytes]], None]) -> None:
    """Call `writer` on a binary file beside `path` (`.<name>.tmp`), sync it, and rename it over `path`.
    One fixed temporary name, so that the next write replaces a killed writer's leftover: the outputs
    written this way belong to a run that holds its output_dir (`epsdpo.run_lock`), so no other writer
    shares the name."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
