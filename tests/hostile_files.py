"""Files that are not what their name promises (a FIFO, a directory, a link to /dev/zero, a huge
file), and a guard that fails a test instead of letting a regression block the suite forever."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable

# What each hostile kind is called in a refusal (epsdpo.safe_files).
HOSTILE_KINDS = {
    "fifo": "is not a regular file (it is a FIFO)",
    "directory": "is not a regular file (it is a directory)",
    "link to /dev/zero": "is not a regular file (it is a character device)",
}


def make_hostile(kind: str, path: Path) -> str:
    """Put a hostile `kind` at `path` (replacing what is there); return how a refusal describes it."""
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)  # reading it waits for a writer, forever
    elif kind == "directory":
        path.mkdir()
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")  # reading it fills memory
    else:
        raise ValueError(kind)
    return HOSTILE_KINDS[kind]


def finishes_within(seconds: float, call: Callable[[], Any], fifo: Path | None = None) -> Any:
    """`call()`'s result, or its exception re-raised; fails the test if it runs longer than `seconds`
    (then a writer opens `fifo`, if given, so that a reader blocked on it returns and the thread ends)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            with open(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), "wb"):
                pass
        raise AssertionError(f"still running after {seconds} s: blocked on a file it should have refused")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
