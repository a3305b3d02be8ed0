"""Data parallelism under `torchrun`, on torch's own engine (DDP; FSDP2 lives in epsdpo.sharding).

Each rank's loss is its pairs' loss sum over the cycle's global pair count times the world size, so
DDP's average over ranks is exactly the global mean. Gradients are exchanged once per optimizer step,
during the backward of the cycle's last micro-batch (`no_sync` on the others).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

# transformers' TrainingArguments.ddp_timeout default, and torch's own for gloo
DEFAULT_TIMEOUT_S = 1800


class PeerTimeoutError(RuntimeError):
    """A rank waited `ddp_timeout` seconds in a collective for another rank, which never answered
    (it hung, stalled or died); names the setting, the underlying error is its cause."""


def timed_out(error: BaseException) -> bool:
    """Whether `error` is a collective giving up on a peer after the process group's timeout: gloo
    raises a RuntimeError saying 'Timed out waiting Nms for ...' (NCCL's watchdog ends the process
    instead, so nothing reaches Python there)."""
    return isinstance(error, RuntimeError) and "Timed out waiting" in str(error)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


# How long a rank leaving the process group waits for its peers to leave too (`_leave_process_group`)
EXIT_WAIT_S = 10


def init_from_env(timeout_s: int = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group `torchrun` describes in the environment; a single process otherwise.

    `timeout_s` (`TrainConfig.ddp_timeout`) bounds every wait on the other ranks: forming the group
    and each collective. Without it a peer that stops responding without dying (SIGSTOP, a hung
    GPU, a stalled read) holds every other rank in its collective for torch's default, and the
    launcher's agent, which watches for exits, never notices. On gloo the collective raises after
    `timeout_s`; on NCCL the watchdog aborts the communicator and ends the process (torch's
    TORCH_NCCL_ASYNC_ERROR_HANDLING default), which torchrun sees as a failed worker."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # The rank's GPU is chosen before the group forms: NCCL's communicator is then created on it
    # (eagerly, with `device_id`) instead of on GPU 0 by every rank, and barriers know their device
    device_id = None
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device_id = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if device_id is None:
            dist.init_process_group("gloo", timeout=timeout)
        else:
            dist.init_process_group("nccl", timeout=timeout, device_id=device_id)
        atexit.register(_leave_process_group)
    else:  # a group the caller formed: ddp_timeout still holds from here on
        dist.set_timeout(timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def _leave_process_group() -> None:
    """At interpreter exit: a process group still alive then aborts the process (gloo's threads are
    destroyed during finalization: SIGABRT, "terminate called without an active exception"), and so
    does one destroyed while a peer's gloo connection is still open and the peer then leaves. So the
    ranks first wait for each other, briefly (a peer that is gone or stuck elsewhere is not waited
    for longer than EXIT_WAIT_S), then destroy the group."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=EXIT_WAIT_S))
        except RuntimeError:
            pass  # a peer that did not come: leave anyway
    dist.destroy_process_group()


def restart_count() -> int:
    """Which restart of the job this is: torchrun (`--max-restarts`) sets TORCHELASTIC_RESTART_COUNT in
    each worker's environment, 0 on the first attempt; 0 outside torchrun."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0").strip() or "0"
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"TORCHELASTIC_RESTART_COUNT={value!r} is not a count of restarts (an integer)") from None
    if count < 0:
        raise ValueError(f"TORCHELASTIC_RESTART_COUNT={value!r} is negative")
    return count


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: Tensor, info: DistInfo) -> Tensor:
    """Sum `values` over ranks in place (host tensors travel through the GPU where NCCL needs it)."""
    if info.enabled:
        if dist.get_backend() == "nccl" and not values.is_cuda:
            on_device = values.cuda()
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
            values.copy_(on_device)
        else:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, info: DistInfo) -> bool:
    """Whether `flag` holds on any rank (one all-reduce; every rank must call it)."""
    return all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64), info).item() > 0


def broadcast_from_main(value: Any, info: DistInfo) -> Any:
    """Rank 0's `value` on every rank (every rank must call it). Pickled, but only between this run's
    own processes: never used for anything read from a file."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_from_all(value: Any, info: DistInfo) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (every rank must call it; pickled between
    this run's own processes only, as `broadcast_from_main`)."""
    if not info.enabled:
        return [value]
    values: list[Any] = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


def on_main_rank(action: Callable[[], None], info: DistInfo, catch: tuple[type[Exception], ...],
                 failed_there: Callable[[], Exception]) -> None:
    """Run `action` on rank 0 alone; every rank learns whether it raised one of `catch` and raises too
    (rank 0 its own error, the others `failed_there()`), so that a refusal stops every rank together
    instead of leaving the others waiting in the next collective."""
    error = None
    if info.is_main:
        try:
            action()
        except catch as caught:
            error = caught
    failed = any_rank(error is not None, info)
    if error is not None:
        raise error
    if failed:
        raise failed_there()


def replicate(model: nn.Module, device: torch.device) -> nn.Module:
    """The policy's `Scorer` under `DistributedDataParallel`: every use of the parameters happens in
    its one forward call, so DDP's reducer sees them all, and it averages gradients over ranks in
    buckets while backward still runs."""
    from torch.nn.parallel import DistributedDataParallel

    from epsdpo.scoring import Scorer

    # device_ids=None: the batch is already on the device, and DDP then passes arguments untouched
    return DistributedDataParallel(Scorer(model), device_ids=None, broadcast_buffers=False)


def gradient_sync(unit: nn.Module, sync: bool) -> AbstractContextManager[None]:
    """Context for one micro-batch's forward and backward: exchange gradients over ranks only when
    `sync` (the cycle's last micro-batch); the others accumulate locally. DDP takes `no_sync()`, an
    FSDP root a flag; a plain module needs nothing."""
    no_sync = getattr(unit, "no_sync", None)
    if no_sync is not None:
        return nullcontext() if sync else no_sync()
    set_sync = getattr(unit, "set_requires_gradient_sync", None)
    if set_sync is not None:
        set_sync(sync)
    return nullcontext()


def gather_bytes(data: bytes, info: DistInfo) -> list[bytes]:
    """Every rank's `data`, in rank order, on every rank (every rank must call it). Two all-gathers
    of tensors, the lengths and then the bytes padded to the longest: nothing is pickled, so a peer's
    bytes are data to validate, never code (torch's all_gather_object would unpickle them)."""
    if not info.enabled:
        return [data]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(info.world_size)]
    dist.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    mine = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    parts = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(parts, mine)
    return [part[:size].cpu().numpy().tobytes() for part, size in zip(parts, sizes)]
