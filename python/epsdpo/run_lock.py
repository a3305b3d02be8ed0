"""One run at a time in an output_dir: an exclusive lock held from the start of `train()` to its end.

Two runs started together in one output_dir would both find it free (or both resume it), then write
over each other's checkpoints and interleave their metrics.jsonl. Rank 0 takes `fcntl.flock` on
`<output_dir>/.epsdpo.lock` before anything else looks at the folder, and writes its pid and host
into it; a second run fails at once with `OutputDirBusyError` naming that holder.

The kernel drops a flock when its process dies however it dies (kill -9 included), so a lock file
left by a dead run never blocks the next one: the next run takes the lock and warns that the holder
the file names is gone. A run that ends normally (or by an exception) removes the file.

Limits: flock is advisory (it stops other epsdpo runs, not other programs), and it is only as good
as the filesystem's locking: local filesystems and NFSv4 honour it between hosts; NFSv3 without
lockd, and some FUSE or parallel filesystems mounted without lock support, refuse it, in which case
the run goes on unlocked with a warning saying so.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import warnings
from pathlib import Path


from epsdpo.distributed import DistInfo, on_main_rank

LOCK_FILE = ".epsdpo.lock"
# errors with which a filesystem says it does not do locks at all (as opposed to "someone holds it")
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class OutputDirBusyError(RuntimeError):
    """Another live run holds this output_dir's lock; names its pid and host."""


class RunLock:
    """The exclusive lock on one output_dir (rank 0 holds it; the other ranks hold nothing)."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None
        self._made_dir = False

    def acquire(self) -> None:
        """Take the lock or raise `OutputDirBusyError`; creates output_dir when missing."""
        self._made_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise OutputDirBusyError(
                    f"output_dir {self.path.parent} is in use by another run ({_describe(holder)}, lock file "
                    f"{self.path}): wait for it to end or choose another output_dir"
                ) from None
            except OSError as error:
                os.close(fd)
                if error.errno not in _NO_LOCKING:
                    raise
                warnings.warn(f"{self.path.parent}: the filesystem does not support file locks ({error.strerror}), "
                              "so nothing stops a second run from using this output_dir at the same time",
                              stacklevel=3)
                return
            # A run that was releasing removed the file between our open and our flock: the lock we
            # hold is on a file nobody else will open, so start again on the one at the path.
            if not _same_file(fd, self.path):
                os.close(fd)
                continue
            break
        previous = _read(fd)
        if previous:
            warnings.warn(f"{self.path} was left by a run that is gone ({_describe(previous)}); taking it over",
                          stacklevel=3)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order, so that no run ever takes a lock
        on a file that is about to disappear without noticing: see `acquire`). An output_dir this lock
        created and the run left empty (it was refused before writing anything) goes too."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None
        if self._made_dir:
            try:
                self.path.parent.rmdir()  # only when empty
            except OSError:
                pass


def lock_output_dir(output_dir: Path, dist: DistInfo) -> RunLock:
    """Rank 0 takes the lock; every rank learns whether it did (one all-reduce, as `_verify_once`
    does), so that a refusal stops every rank instead of leaving the others waiting in a barrier."""
    lock = RunLock(output_dir)
    on_main_rank(lock.acquire, dist, (OutputDirBusyError, OSError),
                 lambda: OutputDirBusyError(f"rank 0 could not lock output_dir {output_dir} (its error says why)"))
    return lock


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def _describe(holder: str) -> str:
    """'pid N on host H' from the lock file's one line, or what the file says when it is not ours."""
    words = holder.split()
    if len(words) == 4 and words[0] == "pid" and words[2] == "host":
        return f"pid {words[1]} on host {words[3]}"
    return f"the lock file says {holder!r}" if holder else "its pid was not written yet"


def _same_file(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
