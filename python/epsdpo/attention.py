"""Mask-free attention over the segments of a collated batch (variable-length, "varlen" attention).

A packed row holds several sequences end to end. Running it with a 4-D mask costs attention over the
whole row (L² per row) plus the mask itself; attending inside each segment costs Σ Lᵢ² and needs no
mask. Two implementations take the segment boundaries as `cu_seq_lens_q/k` + `max_length_q/k`
keyword arguments, which transformers passes from the model call down to every attention layer:

- flash-attention (`flash_attention_2`/`_3`, where installed): transformers' own varlen path;
- `SEGMENT_SDPA` (registered here), a drop-in for `sdpa` that needs no extra install: without segment
  arguments it behaves exactly like sdpa (generation, evaluation). With them it runs, best first:
  torch's own varlen kernel (`torch.nn.attention.varlen.varlen_attn` with `window_size` and `enable_gqa`, as in torch 2.15; CUDA, half
  precision) in one call for the whole batch; else causal sdpa on each segment, for any device.
  Under autocast q, k, v are handed to the kernel in autocast's dtype: it is a custom op with no
  autocast rule, and q, k arrive float32 there (RoPE computes in float32) while v is already half.
  With segment arguments no mask is built either (`_segment_mask`): the segments say who attends
  to whom, so a sliding-window model gets no unused [R, 1, L, L] window mask.

Shared-prompt batches are not sequences end to end (a rejected answer must not see the chosen one
beside it), so no varlen call expresses them. On CUDA they attend through `flex_attention` with a
block mask of the batch's rule (`segment_block_mask`), which skips the masked blocks instead of
materialising an L×L mask; elsewhere they keep the 4-D mask (flex has no CPU backward). The block
mask is built by a compiled `create_block_mask` (eager, it materialises the B×1×L×L mask it
compresses) once per batch (`BatchBlockMask`), shared by the policy and reference forwards.

Each path is one module-level function (`_varlen`, `_flex_attention`, `_sdpa_per_segment`), so a
check can count which one ran by wrapping it.

Boundaries are offsets into the batch flattened to R·L tokens; a run of padding is a segment of its
own, so every token belongs to one segment (its outputs are never scored).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SEGMENT_SDPA = "epsdpo_segment_sdpa"
_FLASH = ("flash_attention_2", "flash_attention_3")
VARLEN_IMPLEMENTATIONS = (SEGMENT_SDPA, *_FLASH)


def segment_boundaries(segment_ids: Tensor) -> Tensor:
    """int32 offsets [S+1] of the runs of equal segment id in `segment_ids` [R, L] flattened row-major;
    a new row always starts a new run."""
    rows, length = segment_ids.shape
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::length] = True
    offsets = torch.nonzero(starts).reshape(-1)
    end = torch.tensor([rows * length], dtype=offsets.dtype, device=offsets.device)
    return torch.cat([offsets, end]).to(torch.int32)


def varlen_kwargs(segment_ids: Tensor, implementation: str, cu_seqlens: Any = None,
                  max_seqlen: int | None = None) -> dict[str, Tensor | int]:
    """The keyword arguments a varlen attention implementation reads: the collator's `cu_seqlens` /
    `max_seqlen` where the batch carries them (no device sync), else worked out from the segment ids."""
    if cu_seqlens is not None and max_seqlen is not None:
        cu, longest = torch.as_tensor(cu_seqlens, dtype=torch.int32), int(max_seqlen)
    else:
        cu = segment_boundaries(segment_ids.cpu())
        longest = int((cu[1:] - cu[:-1]).max())
    if implementation in _FLASH:
        cu = cu.to(segment_ids.device)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


@functools.cache
def _varlen_attn():
    """torch's varlen attention, or None where this torch's version of it lacks the `window_size` and
    `enable_gqa` arguments the call below passes (early releases took `is_causal` instead); the
    per-segment loop then runs. Cached: every attention layer of every forward asks."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if _takes(varlen_attn, "window_size", "enable_gqa") else None


def _takes(function: Any, *names: str) -> bool:
    import inspect

    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return all(name in parameters for name in names)


def flex_attention_available(device: torch.device) -> bool:
    """Whether shared-prompt batches on `device` can attend through flex_attention (CUDA only: flex
    has no CPU backward)."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _compiles_flex(device: torch.device) -> bool:
    """Whether flex's pieces run compiled on `device`: on CUDA, where eager flex materialises what it
    exists to avoid; elsewhere flex only serves tests, which the compile time would dominate."""
    return device.type == "cuda"


def segment_block_mask(segment_ids: Tensor, branch_ids: Tensor) -> object:
    """A flex_attention `BlockMask` of the batch attention rule (epsdpo.scoring): same segment,
    causal, and a branch sees the shared part and itself; padding attends only to itself."""
    rows, length = segment_ids.shape

    def allowed(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        seg_q, seg_k, br_q, br_k = segment_ids[b, q], segment_ids[b, k], branch_ids[b, q], branch_ids[b, k]
        inside = (seg_q == seg_k) & (seg_k >= 0) & (k <= q) & ((br_k == 0) | (br_k == br_q))
        return inside | ((q == k) & (seg_q < 0))

    build = _create_block_mask(segment_ids.device)
    return build(allowed, rows, None, length, length, device=segment_ids.device)


_compiled_create_block_mask = None


def _create_block_mask(device: torch.device) -> Any:
    """create_block_mask, compiled once where flex runs compiled. Eager, it evaluates the mask rule on
    the whole B×1×L×L grid (plus vmap intermediates) before compressing it; compiled, the evaluation
    fuses into the per-block reduction and no L×L tensor is stored. torch.compile(create_block_mask)
    is the way torch 2.15's sources give (its `_compile=True` flag is deprecated and does the same)."""
    global _compiled_create_block_mask
    from torch.nn.attention.flex_attention import create_block_mask

    if not _compiles_flex(device):
        return create_block_mask
    if _compiled_create_block_mask is None:
        _compiled_create_block_mask = torch.compile(create_block_mask)
    return _compiled_create_block_mask


class BatchBlockMask:
    """The block mask of one batch, built on first request and handed to every later request for the
    same batch tensors: the policy and the reference forward share it (each layer already shares its
    forward's). Another batch's tensors (a reference on another device) get their own."""

    def __init__(self) -> None:
        self._built: tuple[Tensor, Tensor, object] | None = None

    def get(self, segment_ids: Tensor, branch_ids: Tensor) -> object:
        built = self._built
        if built is None or built[0] is not segment_ids or built[1] is not branch_ids:
            built = self._built = (segment_ids, branch_ids, segment_block_mask(segment_ids, branch_ids))
        return built[2]


_compiled_flex = None


def _flex_attention(query: Tensor, key: Tensor, value: Tensor, block_mask: object, scaling: float | None,
                    gqa: bool) -> Tensor:
    """flex_attention, compiled once on CUDA (eager flex materialises the scores)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not _compiles_flex(query.device):
        return flex_attention(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa)


def _is_block_mask(mask: object) -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:
        return False
    return isinstance(mask, BlockMask)


# Where and in what torch's varlen kernel runs: its flash-attention and cuDNN backends are CUDA-only
# and half precision only
_VARLEN_DEVICES = ("cuda",)
_VARLEN_DTYPES = (torch.float16, torch.bfloat16)


def varlen_kernel_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's varlen kernel can take a batch on `device` in `dtype`."""
    return device.type in _VARLEN_DEVICES and dtype in _VARLEN_DTYPES and _varlen_attn() is not None


def _attention_dtype(query: Tensor) -> torch.dtype:
    """The dtype attention computes in: autocast's where autocast is on for the query's device, as
    sdpa under autocast would take its operands, else the query's own."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return query.dtype


def _segment_sdpa(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: Tensor | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Causal sdpa inside each segment; plain sdpa when no segments are given.

    query [R, Hq, L, D], key/value [R, Hkv, L, D] → output [R, L, Hq, D], as transformers expects.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _is_block_mask(attention_mask):  # a shared-prompt batch on CUDA (see segment_block_mask)
        gqa = query.shape[1] != key.shape[1]
        return _flex_attention(query, key, value, attention_mask, scaling, gqa).transpose(1, 2).contiguous(), None
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, **kwargs,
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("segment attention runs sdpa, which has no attention-logit softcapping; use eager")
    if kwargs.get("position_bias") is not None or kwargs.get("is_causal") is False:
        raise NotImplementedError(
            "this model's attention adds a position bias or is not causal, which segment attention does not "
            "apply; load it with attn_implementation='eager' to train on packed or padded batches"
        )
    # The kernel takes no dropout, and the custom op has no autocast rule: give it q, k, v in the
    # dtype autocast would have chosen (q, k arrive float32, v half, under autocast over float32 weights)
    dtype = _attention_dtype(query)
    if not (dropout and module.training) and varlen_kernel_supports(query.device, dtype):
        query, key, value = (t.to(dtype) for t in (query, key, value))
        return _varlen(query, key, value, cu_seq_lens_q, kwargs.get("max_length_q"), scaling, sliding_window), None
    dropout_p = dropout if module.training else 0.0
    return _sdpa_per_segment(query, key, value, cu_seq_lens_q, dropout_p, scaling, sliding_window), None


def _sdpa_per_segment(query: Tensor, key: Tensor, value: Tensor, cu_seq_lens: Tensor, dropout_p: float,
                      scaling: float | None, sliding_window: int | None) -> Tensor:
    """Causal sdpa on each segment in turn, for any device and dtype; query [R, Hq, L, D] → [R, L, Hq, D]."""
    rows, heads, length, dim = query.shape
    # [R, H, L, D] → [H, R·L, D]: segments are then contiguous slices along dim 1
    flat_q, flat_k, flat_v = (t.transpose(0, 1).reshape(t.shape[1], rows * length, dim) for t in (query, key, value))
    gqa = flat_q.shape[0] != flat_k.shape[0]
    bounds = cu_seq_lens.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        span = end - start
        band = None
        if sliding_window is not None and span > sliding_window:
            # token i sees j in (i − window, i]: transformers' sliding-window convention
            index = torch.arange(span, device=query.device)
            offset = index[:, None] - index[None, :]
            band = (offset >= 0) & (offset < sliding_window)
        outputs.append(F.scaled_dot_product_attention(
            flat_q[:, start:end], flat_k[:, start:end], flat_v[:, start:end],
            attn_mask=band, dropout_p=dropout_p, is_causal=band is None, scale=scaling, enable_gqa=gqa,
        ))
    out = torch.cat(outputs, dim=1)  # [H, R·L, D]
    return out.reshape(heads, rows, length, dim).permute(1, 2, 0, 3).contiguous()


def _varlen(query: Tensor, key: Tensor, value: Tensor, cu_seq_lens: Tensor, longest: int | None,
            scaling: float | None, sliding_window: int | None) -> Tensor:
    """All segments in one call of torch's varlen kernel; query [R, Hq, L, D] → [R, L, Hq, D]."""
    rows, heads, length, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(rows * length, t.shape[1], dim) for t in (query, key, value))
    cu = cu_seq_lens.to(query.device, torch.int32, non_blocking=True)
    if longest is None:
        longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    # Token i sees j in (i − window, i] (transformers' convention): window − 1 tokens to the left
    window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    out = _varlen_attn()(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=window,
                         enable_gqa=q.shape[1] != k.shape[1])
    return out.reshape(rows, length, heads, dim)


# Set for the duration of a model call that passes segment boundaries (see `segments_given`)
_segments_given: ContextVar[bool] = ContextVar("epsdpo_segments_given", default=False)


@contextmanager
def segments_given() -> Iterator[None]:
    """Scope of a model call whose attention layers get segment boundaries (`varlen_kwargs`): its mask
    builder then builds nothing. transformers hands a mask builder only sizes and a 2-D mask, never
    the call's keyword arguments, so the call says so here."""
    token = _segments_given.set(True)
    try:
        yield
    finally:
        _segments_given.reset(token)


def _segment_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """`SEGMENT_SDPA`'s mask builder: none inside `segments_given` (attention runs inside each segment
    and reads no mask, and a sliding-window model would otherwise get a [R, 1, L, L] one), else
    sdpa's. Training batches pass an all-ones 2-D mask, for which sdpa's builder returns None unless
    a sliding window is shorter than the rows."""
    from transformers.masking_utils import sdpa_mask

    if _segments_given.get():
        return None
    return sdpa_mask(*args, **kwargs)


_registered = False


def register() -> None:
    """Make `SEGMENT_SDPA` a valid `attn_implementation` (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SEGMENT_SDPA, _segment_sdpa)
    AttentionMaskInterface.register(SEGMENT_SDPA, _segment_mask)
    _registered = True


def use_segment_attention(model: nn.Module) -> bool:
    """Switch a transformers model running `sdpa` to `SEGMENT_SDPA` in place; True when the model now
    runs a varlen implementation (flash-attention models already do).

    The switch is permanent rather than scoped to a forward pass because gradient checkpointing
    re-runs attention during backward, outside any scope. It is safe to keep: without segment
    arguments the implementation is sdpa, and the name is never saved with the config.
    """
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation in VARLEN_IMPLEMENTATIONS:
        return True
    if implementation != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    register()
    model.set_attn_implementation(SEGMENT_SDPA)
    return getattr(model.config, "_attn_implementation", None) == SEGMENT_SDPA
