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

Shared-prompt batches are not sequences end to end (a rejected answer must not see the chosen one
beside it), so no varlen call expresses them. On CUDA they attend through `flex_attention` with a
block mask of the batch's rule (`segment_block_mask`), which skips the masked blocks instead of
materialising an L×L mask; elsewhere they keep the 4-D mask (flex has no CPU backward).

Boundaries are offsets into the batch flattened to R·L tokens; a run of padding is a segment of its
own, so every token belongs to one segment (its outputs are never scored).
"""

from __future__ import annotations

import functools
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


def segment_block_mask(segment_ids: Tensor, branch_ids: Tensor) -> object:
    """A flex_attention `BlockMask` of the batch attention rule (epsdpo.scoring): same segment,
    causal, and a branch sees the shared part and itself; padding attends only to itself."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = segment_ids.shape

    def allowed(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        seg_q, seg_k, br_q, br_k = segment_ids[b, q], segment_ids[b, k], branch_ids[b, q], branch_ids[b, k]
        inside = (seg_q == seg_k) & (seg_k >= 0) & (k <= q) & ((br_k == 0) | (br_k == br_q))
        return inside | ((q == k) & (seg_q < 0))

    return create_block_mask(allowed, rows, None, length, length, device=segment_ids.device)


_compiled_flex = None


def _flex_attention(query: Tensor, key: Tensor, value: Tensor, block_mask: object, scaling: float | None,
                    gqa: bool) -> Tensor:
    """flex_attention, compiled once on CUDA (eager flex materialises the scores)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if query.is_cuda and _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    run = _compiled_flex if query.is_cuda else flex_attention
    return run(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa)


def _is_block_mask(mask: object) -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:
        return False
    return isinstance(mask, BlockMask)


def _varlen_usable(query: Tensor, dropout: float, training: bool) -> bool:
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None
            and not (dropout and training))


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
    rows, heads, length, dim = query.shape
    if _varlen_usable(query, dropout, module.training):
        return _varlen(query, key, value, cu_seq_lens_q, kwargs.get("max_length_q"), scaling, sliding_window), None
    # [R, H, L, D] → [H, R·L, D]: segments are then contiguous slices along dim 1
    flat_q, flat_k, flat_v = (t.transpose(0, 1).reshape(t.shape[1], rows * length, dim) for t in (query, key, value))
    gqa = flat_q.shape[0] != flat_k.shape[0]
    bounds = cu_seq_lens_q.tolist()
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
            attn_mask=band, dropout_p=dropout if module.training else 0.0,
            is_causal=band is None, scale=scaling, enable_gqa=gqa,
        ))
    out = torch.cat(outputs, dim=1)  # [H, R·L, D]
    return out.reshape(heads, rows, length, dim).permute(1, 2, 0, 3).contiguous(), None


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


_registered = False


def register() -> None:
    """Make `SEGMENT_SDPA` a valid `attn_implementation` (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENT_SDPA, _segment_sdpa)
    # Masks are built as for sdpa; training batches pass an all-ones 2-D mask, for which sdpa's mask
    # builder returns None, so no L×L mask is ever made for them.
    AttentionMaskInterface.register(SEGMENT_SDPA, sdpa_mask)
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
