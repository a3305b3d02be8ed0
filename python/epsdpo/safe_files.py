"""Reading a small file named by a user or a checkpoint without trusting what the name points to.

`Path.read_text` on a FIFO blocks until a writer comes, forever; on a link to `/dev/zero` it reads
until memory runs out. `read_regular_file` opens without blocking, checks on the opened descriptor
(not the name, which could be swapped in between) that it is a regular file, and reads at most a
bound, so each of those is a one-line refusal instead.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class FileRefused(ValueError):
    """The path exists but is not a regular file of bounded size. The message names the path; `reason`
    alone says why ("is not a regular file (it is a FIFO)"), for callers that name the file themselves."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path} {reason}")
        self.path, self.reason = str(path), reason


def open_regular_file(path: str | Path) -> int:
    """A read-only descriptor of `path`, which must be a regular file (links followed). Opening
    never blocks: O_NONBLOCK makes a FIFO with no writer open at once, and it is then refused.
    Raises FileNotFoundError (and other OSErrors) as os.open does, FileRefused for a non-file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileRefused(path, f"is not a regular file (it is {_kind(mode)})")
        os.set_blocking(fd, True)  # a regular file: reads are ordinary from here on
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of `path`, a regular file of at most `max_bytes`; FileRefused otherwise."""
    with os.fdopen(open_regular_file(path), "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileRefused(path, f"is over {max_bytes:,} bytes")
    return data


def why_unreadable(error: OSError | FileRefused) -> str:
    """What `open_regular_file` / `read_regular_file` raised, as words to follow the file's name: "no
    such file", the refusal's reason ("is not a regular file (it is a FIFO)", "is over N bytes"), or
    "cannot be read (<strerror>)"."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, FileRefused):
        return error.reason
    return f"cannot be read ({error.strerror or error})"


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a file")
