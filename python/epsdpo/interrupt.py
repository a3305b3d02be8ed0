"""SIGTERM and SIGINT as a request to stop cleanly: finish the optimizer step, checkpoint, exit.

Preemption clusters (SLURM, Kubernetes, spot instances) end a job with SIGTERM and a grace period;
an interactive run ends with Ctrl-C. Killing the loop there would lose every step since the last
checkpoint (the whole run without `save_steps`). While `train()` runs, the first SIGTERM/SIGINT only
sets a flag; the loop reads it after each optimizer step, every rank agrees (one tiny all-reduce per
step under torchrun, since the signal may reach only some ranks), every rank saves that step's
checkpoint together, and `train()` raises `TrainingInterrupted`, which `epsdpo train` turns into
exit code 128 + the signal's number (143 for SIGTERM, 130 for SIGINT). A second signal does not
wait: it gets what it would have got without epsdpo, at once (SIGTERM's default action ends the
process; SIGINT raises Python's KeyboardInterrupt, or runs whatever handler the process had).

Handlers can only be installed on the main thread; `train()` on another thread keeps the process's
own handlers (and so the old behaviour), and a signal the process ignores stays ignored. The
previous handlers are restored when `train()` returns or raises.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from epsdpo.distributed import DistInfo, any_rank

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(RuntimeError):
    """`train()` stopped on SIGTERM/SIGINT after saving a checkpoint of its last finished step.
    `exit_code` is what a process ending this way should return: 128 + the signal's number."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; {checkpoint} was written: resume with "
            f"resume_from_checkpoint=True (`epsdpo train ... --resume`)"
        )


class StopOnSignal:
    """Context manager: while inside, the first SIGTERM/SIGINT is recorded instead of acted on."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                if signal.getsignal(signum) == signal.SIG_IGN:
                    continue  # ignored on purpose (`nohup`, a background job's SIGINT): still ignored
                self._previous[signum] = signal.signal(signum, self._handle)
                # The kernel may deliver the signal to any thread (gloo's, the feed's); restart the
                # system call it interrupts there instead of failing it with EINTR. Python's own
                # handler only runs on the main thread, between bytecodes, either way.
                signal.siginterrupt(signum, False)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            # A second signal: the user (or the cluster) will not wait for the checkpoint. It gets
            # what it would have got without epsdpo: Python's KeyboardInterrupt for SIGINT (so a
            # notebook's kernel is interrupted, not killed), the default action (death) for SIGTERM.
            previous = self._previous.get(signum)
            self._restore()
            os.write(2, f"\nepsdpo: second {name}: stopping at once, without a checkpoint\n".encode())
            if callable(previous):
                previous(signum, frame)
                return
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        # os.write, not print: a handler may run in the middle of another write to stderr
        os.write(2, f"\nepsdpo: {name} received: finishing this optimizer step, then saving a checkpoint "
                    f"(send it again to stop at once)\n".encode())

    def agreed(self, dist: DistInfo) -> int | None:
        """After an optimizer step, on every rank: the signal to stop for when any rank received one
        (this rank's own, else SIGTERM), otherwise None."""
        if not dist.enabled:
            return self.signum
        if not any_rank(self.signum is not None, dist):
            return None
        return self.signum if self.signum is not None else int(signal.SIGTERM)
