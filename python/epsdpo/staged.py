"""Outputs that appear whole or not at all, as checkpoints do: a folder is written under a hidden
staging name and renamed into place; a file is written to a hidden temporary name beside it and
renamed over the old one. A process killed midway leaves the earlier output (or none) and a hidden
leftover that the next write of the same output removes: never a `final/` without its tokenizer or
model card, nor a truncated `beta_ledger.npz`.

A folder's files can also be published into a folder that holds other things (`publish_files`: the
final model into output_dir itself, where `from_pretrained(output_dir)` looks for it): file by file,
with the files a reader looks for first (`config.json`) removed before and put back last.
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


def publish_files(source: Path, into: Path, markers: tuple[str, ...]) -> None:
    """Put every entry of the finished folder `source` into `into`, which holds other things too (so
    `source` cannot simply be renamed into place). A reader that needs one of `markers` to find the
    rest (`from_pretrained` reads config.json first) sees the old files, none, or the new ones whole:
    the markers in `into` are removed first, each other entry is copied to a hidden name and renamed
    over its namesake, and the markers come last, the same way. Copied, not hard-linked: a later write
    in place (TRL's habit `trainer.save_model(output_dir)`) would otherwise write through into `source`
    too, and a crash there would damage both."""
    for name in markers:
        (into / name).unlink(missing_ok=True)
    entries = sorted(source.iterdir(), key=lambda entry: entry.name in markers)  # markers last
    for entry in entries:
        if entry.is_dir():
            write_folder(into / entry.name, lambda staging, entry=entry: shutil.copytree(entry, staging,
                                                                                       dirs_exist_ok=True))
            continue
        tmp = into / f".{entry.name}.tmp"
        tmp.unlink(missing_ok=True)
        shutil.copyfile(entry, tmp)
        os.replace(tmp, into / entry.name)
