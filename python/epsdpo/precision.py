"""Numeric precision of a run: how weights are stored, how forward passes compute, how fp16 is scaled.

The rule (docs/precision.md): trained weights are float32 ("master weights"), and `bf16=True` /
`fp16=True` only lower the precision forward passes compute in, through `torch.autocast`, as TRL's
`bf16` does. Pure half-precision training is refused: at DPO's learning rates (5e-7) almost every
AdamW update is below half a bf16 ulp of the weight it updates (a 0.02 weight has an ulp of ~1e-4),
so the weights never move while the run logs a loss and finishes normally. fp16's narrow exponent
also needs the loss scaled up before backward and the gradients scaled back down before clipping.

fp16 loss scaling skips a step whose gradients overflowed and halves the scale. A gradient that is
non-finite whatever the scale (an inf from the forward pass itself) would be skipped forever while
the run logs steps and writes checkpoints, so `Precision.stalled` gives up after
`MAX_CONSECUTIVE_SKIPPED_STEPS` skipped steps in a row, or once the scale is below `MIN_LOSS_SCALE`.

Under FSDP the same policy is FSDP's own `MixedPrecisionPolicy` (bf16 parameters gathered for
compute, fp32 gradient reduction, fp32 sharded master weights) instead of autocast.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MASTER_DTYPES = (torch.float32, torch.float64)
# From GradScaler's starting scale 2**16, 16 halvings reach 1, where unscaled fp16 gradients already fit;
# 20 skips in a row is a scale 16× below that, no longer the range search loss scaling does at the start
# of a run (a healthy run skips a handful of steps then, and about one in 2,000 later).
MAX_CONSECUTIVE_SKIPPED_STEPS = 20
# fp16's smallest normal number: below it a loss of order 1 times the scale is subnormal, so scaling
# no longer protects small gradients from underflow and an overflow cannot have been caused by it.
MIN_LOSS_SCALE = 2.0**-14


def torch_dtype(name: str | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """The torch dtype of a config name ("bfloat16"), or `default` for None."""
    return default if name is None else TORCH_DTYPES[name]


def check_trainable_precision(model: nn.Module, compute_dtype: str | None) -> None:
    """Refuse a policy whose trained weights are not float32: their updates would round away.

    Only parameters that train count, so a PEFT model with a frozen bf16 base and float32 adapters is
    fine (its reference, the base, is never updated)."""
    low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                  if p.requires_grad and p.dtype not in _MASTER_DTYPES})
    if low:
        hint = "bf16=True already computes in bfloat16" if compute_dtype == "bfloat16" else (
            "add bf16=True (or fp16=True) to compute in half precision")
        raise ValueError(
            f"the policy's trainable weights are {', '.join(low)}: an AdamW step at DPO's learning rates is "
            f"below half an ulp of such a weight and rounds away, so the run would not train. Set dtype='float32' "
            f"(TrainConfig.dtype; a model object is then cast to float32) and keep them float32; {hint} over "
            "float32 master weights"
        )


class Precision:
    """The compute precision of one run: an autocast context for forward passes, and for fp16 a
    gradient scaler around backward and the optimizer step.

    `sharded`: FSDP's MixedPrecisionPolicy casts the parameters instead, so no autocast is entered.
    """

    def __init__(self, compute_dtype: str | None, device: torch.device, *, sharded: bool = False) -> None:
        self.dtype = torch_dtype(compute_dtype)
        self.device_type = device.type
        self.autocast_enabled = self.dtype is not None and not sharded
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        self.consecutive_skips = 0

    def autocast(self) -> AbstractContextManager[Any]:
        if not self.autocast_enabled:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring scaled fp16 gradients back to their true size (before clipping measures them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer; False when fp16 gradients overflowed and the scaler skipped the step
        (it then lowers the scale, which is how loss scaling finds its range)."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        applied = self.scaler.get_scale() >= scale
        self.consecutive_skips = 0 if applied else self.consecutive_skips + 1
        return applied

    def stalled(self) -> str | None:
        """Why fp16 loss scaling has given up (too many skipped steps in a row, or a scale below
        `MIN_LOSS_SCALE`), or None while it is still finding its range."""
        if self.scaler is None or not self.consecutive_skips:
            return None
        scale = self.scaler.get_scale()
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPPED_STEPS or scale < MIN_LOSS_SCALE:
            return (f"fp16 gradients were non-finite at {self.consecutive_skips} consecutive steps, so each was "
                    f"skipped, and the loss scale fell to {scale:.3g} (limits: {MAX_CONSECUTIVE_SKIPPED_STEPS} "
                    f"skipped steps in a row, scale 2^{math.log2(MIN_LOSS_SCALE):g}); the gradient is non-finite whatever the "
                    "scale: try bf16=True or fp32, or look for an inf in the forward pass")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def fsdp_mixed_precision(compute_dtype: str | None) -> Any:
    """FSDP2's policy for a compute precision: low-precision parameters for compute, float32
    gradient reduction and sharded master weights. None keeps everything in the weights' dtype."""
    if compute_dtype is None:
        return None
    if compute_dtype == "float16":
        raise ValueError("fp16=True with fsdp=True is not supported (no sharded gradient scaler here); use bf16=True")
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=TORCH_DTYPES[compute_dtype], reduce_dtype=torch.float32)


def apply_tf32(tf32: bool | None, device: torch.device) -> None:
    """The `tf32` setting, through transformers' own switch (`enable_tf32`: torch's fp32_precision):
    true needs a device that computes in TF32 (a CUDA GPU of the Ampere generation or newer) and is
    refused without one rather than ignored; None leaves torch's setting alone."""
    if tf32 is None:
        return
    from transformers.utils.import_utils import enable_tf32, is_torch_tf32_available

    if tf32 and not (device.type == "cuda" and is_torch_tf32_available()):
        raise ValueError(f"tf32=True is invalid: must be False or None on {device} (TF32 needs an Ampere or newer "
                         "CUDA GPU)")
    enable_tf32(tf32)
