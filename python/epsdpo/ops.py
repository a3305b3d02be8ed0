"""Log-probabilities of the labels under the policy, the reference and the two ε-perturbed policies.

ε-DPO (docs/algorithm.md, 'The fused log-prob kernel') scores every completion token under four
distributions built from the same per-token logits f (policy) and r (reference):

    policy      log_softmax(f)[y]                       (with gradient)
    reference   log_softmax(r)[y]                       (no gradient)
    relaxed     log_softmax((1 + ε)·f − ε·r)[y]         (no gradient)
    tightened   log_softmax((1 − ε)·f + ε·r)[y]         (no gradient)

Materialising f and r for every token costs N×V floats each, which dominates the memory of a step for
large vocabularies. `perturbed_logps` instead walks the N scored positions in chunks of rows and the
vocabulary in tiles of columns, projects each tile from the hidden states, folds it into per-row
log-sum-exp statistics, and drops it, so no tensor larger than chunk × vocab tile ever exists.

Logits are `softcap · tanh(logit_scale · (h·Wᵀ + b) / softcap)`, or `logit_scale · (h·Wᵀ + b)` without
soft-capping, which covers tied and untied heads, a head bias, Cohere's `logit_scale`, Granite's
`logits_scaling` and Gemma-2's `final_logit_softcapping`. Statistics are kept in at least float32 even
for bfloat16 models, because the step rule compares differences of sums that are small next to the
sums themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

# `_matmul_` hands bf16/fp16 operands to torch.mm / torch.addmm with `out_dtype=float32` and an fp32
# `out`. Those overloads arrived in torch 2.8 (CUDA kernels only); addmm's CUDA kernel accepts an
# accumulator (`self`) already in the output's precision, which every gradient accumulation of the
# backward passes, from torch 2.10 on (pytorch#167931; 2.8 and 2.9 refuse it). Keep in step with
# pyproject's torch requirement.
MIN_TORCH = (2, 10)


class TorchTooOldError(ImportError):
    """The installed torch lacks the mixed-precision GEMMs the fused kernel calls; names the installed
    and the required version."""


def _torch_release(version: str) -> tuple[int, ...] | None:
    """(major, minor) of a torch version string such as '2.10.0+cu128'; None for an unusual build."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else None


def _mixed_gemms_accepted() -> bool:
    """Whether torch.mm and torch.addmm take the call `_matmul_` makes: bf16 operands, `out_dtype`
    float32, an fp32 `out` that addmm also accumulates into. Tried on the meta device, which runs
    torch's shape and dtype checks without memory or a kernel, so it answers on any machine."""
    acc = torch.empty(2, 2, dtype=torch.float32, device="meta")
    low = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
    try:
        torch.mm(low, low, out=acc, out_dtype=torch.float32)
        torch.addmm(acc, low, low, alpha=-1.0, out=acc, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def check_torch_version() -> None:
    """Refuse, in one line, a torch whose GEMMs lack `out_dtype`, or one older than MIN_TORCH (whose CUDA
    addmm refuses an fp32 accumulator: only a GPU could show that, so the version stands in for it)."""
    release = _torch_release(str(torch.__version__))
    if not _mixed_gemms_accepted() or (release is not None and release < MIN_TORCH):
        required = ".".join(map(str, MIN_TORCH))
        raise TorchTooOldError(
            f"epsdpo needs torch>={required} (torch.mm/addmm with out_dtype into an fp32 accumulator); "
            f"torch {torch.__version__} is installed"
        )


check_torch_version()

# Default (token rows per chunk, vocabulary columns per tile), measured for a 128k vocabulary.
# CPU: one fp32 tile is 16 MiB (ε-DPO keeps four), large enough for full-speed GEMMs and small enough
# to stay in cache across the elementwise passes; full 128k-column rows ran up to twice as slow.
# CUDA (H100, bf16, hidden 4096): small tiles leave the GPU idle between launches; 4096 × 32768 ran
# 3× faster than the CPU tile and as fast as full logits, for about 2 GB of tiles.
DEFAULT_TILES = {"cpu": (512, 8192), "cuda": (4096, 32768)}


class TokenLogps(NamedTuple):
    """Per-position log-probabilities of the labels, each of shape [N]."""

    policy: Tensor
    """Differentiable with respect to the policy hidden states, head weight and bias."""
    reference: Tensor | None
    """None when no reference head was given."""
    relaxed: Tensor
    """Under (1 + ε)·f − ε·r; equal to `policy.detach()` when ε = 0."""
    tightened: Tensor
    """Under (1 − ε)·f + ε·r; equal to `policy.detach()` when ε = 0."""


@dataclass(frozen=True)
class _Tiling:
    chunk_size: int
    vocab_chunk_size: int
    logit_scale: float
    softcap: float | None

    @staticmethod
    def make(
        device: torch.device,
        chunk_size: int | None,
        vocab_chunk_size: int | None,
        logit_scale: float = 1.0,
        softcap: float | None = None,
    ) -> _Tiling:
        rows, cols = DEFAULT_TILES.get(device.type, DEFAULT_TILES["cuda"])
        tiling = _Tiling(chunk_size or rows, vocab_chunk_size or cols, float(logit_scale), softcap)
        if tiling.chunk_size < 1 or tiling.vocab_chunk_size < 1:
            raise ValueError("chunk sizes must be positive")
        return tiling


def perturbed_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ref_hidden: Tensor | None,
    ref_weight: Tensor | None,
    epsilon: float,
    bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    vocab_chunk_size: int | None = None,
) -> TokenLogps:
    """Log-probabilities of `labels` [N] from hidden states [N, H] and heads [V, H] (+ bias [V]).

    `hidden` are the already-gathered hidden states of the scored positions: row i predicts `labels[i]`.
    `ref_hidden`/`ref_weight`/`ref_bias` describe the reference head; pass `ref_hidden=None` when the
    reference log-probs come from elsewhere (then ε must be 0). With ε = 0 the perturbed distributions
    equal the policy, so no perturbation work is done and `relaxed`/`tightened` are `policy.detach()`.
    Both heads share `logit_scale` and `softcap`. Chunk sizes left at None take the device's entry
    in DEFAULT_TILES.
    """
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight must be given together")
    if ref_hidden is None and epsilon != 0:
        raise ValueError("epsilon != 0 needs the reference head (ref_hidden, ref_weight)")
    tiling = _Tiling.make(hidden.device, chunk_size, vocab_chunk_size, logit_scale, softcap)
    hidden, weight, ref_hidden, ref_weight = _autocast_operands(hidden.device, hidden, weight, ref_hidden, ref_weight)
    policy, reference, relaxed, tightened = _HeadLogps.apply(
        hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, float(epsilon), tiling
    )
    if relaxed is None:
        relaxed = tightened = policy.detach()
    return TokenLogps(policy, reference, relaxed, tightened)


@torch.no_grad()
def reference_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    vocab_chunk_size: int | None = None,
) -> Tensor:
    """Chunked log-probabilities of `labels` [N] under one head, without gradient (e.g. to precompute
    reference log-probs)."""
    tiling = _Tiling.make(hidden.device, chunk_size, vocab_chunk_size, logit_scale, softcap)
    hidden, weight = _autocast_operands(hidden.device, hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _forward_chunks(hidden, weight, bias, labels, None, None, None, 0.0, tiling)[0][0]


def perturbed_logps_from_logits(
    logits: Tensor,
    labels: Tensor,
    ref_logits: Tensor | None,
    epsilon: float,
    chunk_size: int | None = None,
) -> TokenLogps:
    """Fallback for models whose head cannot be split off (see `split_causal_lm`): the same four
    log-probabilities from already-materialised logits [N, V]. The policy term goes through plain
    autograd; the reference and perturbed terms are computed in row chunks without gradient."""
    if ref_logits is None and epsilon != 0:
        raise ValueError("epsilon != 0 needs ref_logits")
    wide = logits.to(_stats_dtype(logits.dtype))
    policy = wide.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(wide, dim=1)
    if ref_logits is None:
        return TokenLogps(policy, None, policy.detach(), policy.detach())
    k = 4 if epsilon != 0 else 2
    logps = torch.empty(k, logits.shape[0], dtype=wide.dtype, device=logits.device)
    rows_per_chunk = _Tiling.make(logits.device, chunk_size, None).chunk_size
    with torch.no_grad():
        for start in range(0, logits.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            n = wide[rows].shape[0]
            stack = torch.empty(k, n, logits.shape[1], dtype=wide.dtype, device=logits.device)
            stack[0].copy_(wide[rows])
            stack[1].copy_(ref_logits[rows])
            in_tile = torch.ones(n, dtype=torch.bool, device=logits.device)
            lse, label = _fold_(stack, in_tile, labels[rows], epsilon, False)
            logps[:, rows] = label - lse
    reference = logps[1]
    relaxed, tightened = (logps[2], logps[3]) if k == 4 else (policy.detach(), policy.detach())
    return TokenLogps(policy, reference, relaxed, tightened)


def sequence_logps(values: Tensor, target_sequence: Tensor, num_sequences: int) -> Tensor:
    """Sum per-position `values` [N] into per-sequence totals [num_sequences] (differentiable).

    Every batch layout (padded, packed, shared-prompt) tags each scored position with its sequence,
    so this one reduction turns any layout into the same per-sequence log-probs."""
    out = torch.zeros(num_sequences, dtype=values.dtype, device=values.device)
    return out.index_add(0, target_sequence.to(device=values.device, dtype=torch.long), values)


# --------------------------------------------------------------------------------------------------
# The chunked kernel


def _autocast_operands(device: torch.device, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The head GEMMs' operands in autocast's precision when autocast is on, as a plain matmul under
    autocast would take them; the kernel itself then runs with autocast off and keeps its statistics
    in float32 (see `_matmul_`). The casts are differentiable, so float32 master weights get float32
    gradients."""
    if not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _matmul_(acc: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0, accumulate: bool = True) -> None:
    """acc (+)= alpha · a @ b, with `acc` in the statistics dtype and a, b possibly lower precision.

    On CUDA a low-precision GEMM writes or accumulates straight into the fp32 `acc`; elsewhere the
    operands are upcast (there is no mixed-dtype GEMM off CUDA)."""
    if not acc.is_cuda:
        a, b = a.to(acc.dtype), b.to(acc.dtype)
    mixed = {"out_dtype": acc.dtype} if a.dtype != acc.dtype else {}
    if accumulate:
        torch.addmm(acc, a, b, alpha=alpha, out=acc, **mixed)
    else:
        torch.mm(a, b, out=acc, **mixed)


def _project(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, tiling: _Tiling, out: Tensor
) -> Tensor:
    """Logits of one tile, written into `out` (fp32 or wider), with scale and soft-cap applied."""
    _matmul_(out, hidden, weight.t(), accumulate=False)
    if bias is not None:
        out.add_(bias)
    if tiling.logit_scale != 1.0:
        out.mul_(tiling.logit_scale)
    if tiling.softcap is not None:
        out.div_(tiling.softcap).tanh_().mul_(tiling.softcap)
    return out


def _lse_(x: Tensor) -> Tensor:
    """Row-wise log-sum-exp [rows] of the 2-D `x`, overwriting `x`.

    Hand-rolled in place because torch.logsumexp allocates a temporary as large as its input and
    measured about 3× slower on CPU."""
    m = x.amax(dim=1, keepdim=True)
    # A row of -inf (fully masked) would give nan from (-inf) - (-inf)
    m.masked_fill_(torch.isinf(m), 0.0)
    return x.sub_(m).exp_().sum(dim=1).log_().add_(m.squeeze(1))


def _label_columns(labels: Tensor, v0: int, width: int) -> tuple[Tensor, Tensor]:
    """(whether each row's label falls in columns [v0, v0 + width), its column there, clamped into
    the tile). A mask rather than the matching row indices keeps this free of host syncs on GPUs."""
    cols = labels - v0
    return (cols >= 0) & (cols < width), cols.clamp(0, width - 1)


def _perturb_(stack: Tensor, epsilon: float) -> None:
    """From stack[0] = f and stack[1] = r, fill stack[2] and stack[3] with the relaxed and tightened
    logits f ∓ ε·(r − f), in one fused pass: torch.lerp(f, r, w) = f + w·(r − f), with w broadcast
    over the two output slots, and no f − r intermediate."""
    weights = stack.new_tensor([-epsilon, epsilon]).view(2, 1, 1)
    torch.lerp(stack[0], stack[1], weights, out=stack[2:])


def _fold_(
    stack: Tensor, in_tile: Tensor, cols: Tensor, epsilon: float, shared_shift: bool
) -> tuple[Tensor, Tensor]:
    """(log-sum-exp [k, n], label logit [k, n]) of a stack of k tiles [k, n, w], overwriting it.

    The stack holds f, then r when k ≥ 2; with k = 4 its last two slots are filled here with the
    relaxed and tightened logits. The label logit is 0 on rows whose label lies outside the tile.
    All distributions of the tile are folded by one stacked op sequence: each CPU op pays a thread
    synchronisation, which dominates when the cores are shared.

    With `shared_shift`, f and r are shifted by their own row maxima m_f, m_r before perturbing, so
    the perturbed tiles come out already shifted by lerp(m_f, m_r, ∓ε) and need no max pass of their
    own. For 0 ≤ ε ≤ 1 their largest exponent lies in [0, ε·range(r)] (relaxed) or [−ε·range(r), 0]
    (tightened), so exp overflows or underflows only when ε·range(r) exceeds about 87 (in float32);
    the caller detects that, or any other ε gone wrong, from non-finite results and refolds without
    the shared shift."""
    k, n, width = stack.shape
    label = stack.new_zeros(k, n)
    given = min(k, 2)
    label[:given] = torch.where(in_tile, stack[:given, torch.arange(n, device=stack.device), cols], 0.0)
    if k < 4:
        return _lse_(stack.view(k * n, width)).view(k, n), label
    label[2], label[3] = torch.lerp(label[0], label[1], -epsilon), torch.lerp(label[0], label[1], epsilon)
    if not shared_shift:
        _perturb_(stack, epsilon)
        return _lse_(stack.view(k * n, width)).view(k, n), label
    m = stack[:2].amax(dim=2, keepdim=True)
    m.masked_fill_(torch.isinf(m), 0.0)
    stack[:2].sub_(m)
    _perturb_(stack, epsilon)
    m_f, m_r = m.squeeze(2)
    shifts = torch.stack([m_f, m_r, torch.lerp(m_f, m_r, -epsilon), torch.lerp(m_f, m_r, epsilon)])
    return stack.exp_().sum(dim=2).log_().add_(shifts), label


def _forward_chunks(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ref_hidden: Tensor | None,
    ref_weight: Tensor | None,
    ref_bias: Tensor | None,
    epsilon: float,
    tiling: _Tiling,
    shared_shift: bool = True,
) -> tuple[list[Tensor], Tensor]:
    """([policy, reference?, relaxed?, tightened?] log-probs, each [N]; policy log-sum-exp [N]).

    Each tile's log-sum-exps go into a small [k, n, tiles] tensor that one log-sum-exp combines at
    the end of the chunk, which is exact and simpler than rescaling running sums tile by tile."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype, device = _stats_dtype(hidden.dtype), hidden.device
    k = 1 if ref_hidden is None else (4 if epsilon != 0 else 2)
    rows_max = min(tiling.chunk_size, max(n_rows, 1))
    cols_max = min(tiling.vocab_chunk_size, vocab)
    n_tiles = -(-vocab // cols_max)
    # Flat buffers viewed per tile, so every tile is contiguous and nothing tile-sized is allocated in the loop
    stack_buf = torch.empty(k * rows_max * cols_max, dtype=dtype, device=device)
    logps = torch.empty(k, n_rows, dtype=dtype, device=device)
    policy_lse = torch.empty(n_rows, dtype=dtype, device=device)
    for start in range(0, n_rows, tiling.chunk_size):
        stop = min(start + tiling.chunk_size, n_rows)
        n, y = stop - start, labels[start:stop]
        tile_lse = torch.empty(k, n, n_tiles, dtype=dtype, device=device)
        label_logit = torch.zeros(k, n, dtype=dtype, device=device)
        for t, v0 in enumerate(range(0, vocab, cols_max)):
            v1 = min(v0 + cols_max, vocab)
            stack = stack_buf[: k * n * (v1 - v0)].view(k, n, v1 - v0)
            _project(hidden[start:stop], weight[v0:v1], None if bias is None else bias[v0:v1], tiling, stack[0])
            if k > 1:
                _project(
                    ref_hidden[start:stop],
                    ref_weight[v0:v1],
                    None if ref_bias is None else ref_bias[v0:v1],
                    tiling,
                    stack[1],
                )
            lse, label = _fold_(stack, *_label_columns(y, v0, v1 - v0), epsilon, shared_shift)
            tile_lse[:, :, t] = lse
            label_logit += label
        lse = torch.logsumexp(tile_lse, dim=2)
        policy_lse[start:stop] = lse[0]
        logps[:, start:stop] = label_logit - lse
    if k == 4 and shared_shift and not bool(torch.isfinite(logps[2:]).all()):
        # ε·range(r) too large for the shared shift (see _fold_): redo with a max pass per distribution
        return _forward_chunks(
            hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, epsilon, tiling, shared_shift=False
        )
    return [row.clone() for row in logps], policy_lse


_NO_GRADS = (None,) * 6  # backward's answer for the inputs that take no gradient (labels, reference, ε, tiling)


class _HeadLogps(torch.autograd.Function):
    """Policy log-probs with a chunked backward; reference and perturbed log-probs ride along in the
    same forward pass (they reuse each policy tile) and carry no gradient.

    Gradients are recomputed in backward rather than computed in forward: the gradient of a token's
    log-prob is only known up to its upstream factor dL/dlogp, which depends on the whole DPO loss
    (all tokens of both sequences of the pair) and so is not available while the tiles are formed.
    Computing per-token logit gradients in forward would mean keeping N×V of them, exactly the memory
    this kernel exists to avoid. Recomputing costs one extra tile GEMM per tile; the saved per-row
    log-sum-exp spares the backward a second reduction over the tile.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        ref_hidden: Tensor | None,
        ref_weight: Tensor | None,
        ref_bias: Tensor | None,
        epsilon: float,
        tiling: _Tiling,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        ctx.set_materialize_grads(False)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            logps, policy_lse = _forward_chunks(
                hidden,
                weight,
                bias,
                labels,
                None if ref_hidden is None else ref_hidden.detach(),
                None if ref_weight is None else ref_weight.detach(),
                None if ref_bias is None else ref_bias.detach(),
                epsilon,
                tiling,
            )
        ctx.save_for_backward(hidden, weight, bias, labels, policy_lse)
        ctx.tiling = tiling
        policy, reference, relaxed, tightened = logps + [None] * (4 - len(logps))
        ctx.mark_non_differentiable(*logps[1:])
        return policy, reference, relaxed, tightened

    @staticmethod
    def backward(ctx: Any, grad_policy: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        """With G = dL/dlogits of one tile, P = softmax, C = the soft-cap derivative (1 without one),
        g = dL/dlogp · logit_scale per row, and e_y the label's one-hot row:

            G = diag(g) · (e_y ∘ C − P ∘ C)

        The one-hot part is a gather/scatter per row, and diag(g) is applied to the thin [n, H]
        operands instead of the [n, w] tile, so the tile itself only sees `exp(f − lse)` (and the
        soft-cap factor) before its two GEMMs."""
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_policy is None or not (need_h or need_w or need_b):
            return (None, None, None) + _NO_GRADS
        with torch.autocast(hidden.device.type, enabled=False):  # operands arrive in their chosen dtypes
            return _HeadLogps._backward(ctx, grad_policy, hidden, weight, bias, labels, lse, need_h, need_w, need_b)

    @staticmethod
    def _backward(ctx: Any, grad_policy: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                  lse: Tensor, need_h: bool, need_w: bool, need_b: bool) -> tuple[Tensor | None, ...]:
        tiling: _Tiling = ctx.tiling
        dtype = lse.dtype
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        scaled_grad = grad_policy.to(dtype) * tiling.logit_scale
        grad_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=dtype, device=weight.device) if need_b else None
        rows_max = min(tiling.chunk_size, max(n_rows, 1))
        cols_max = min(tiling.vocab_chunk_size, vocab)
        tile_buf = torch.empty(rows_max * cols_max, dtype=dtype, device=hidden.device)
        cap_buf = torch.empty_like(tile_buf) if tiling.softcap is not None else None
        # GEMM operands stay in the model's precision on CUDA (see _matmul_)
        operand_dtype = hidden.dtype if hidden.is_cuda else dtype
        for start in range(0, n_rows, tiling.chunk_size):
            stop = min(start + tiling.chunk_size, n_rows)
            n, y, g = stop - start, labels[start:stop], scaled_grad[start:stop]
            h = hidden[start:stop]
            h_wide = h.to(dtype)
            g_h = (g[:, None] * h_wide).to(operand_dtype)
            label_coef = g  # g · C at the label
            row_index = torch.arange(n, device=hidden.device)
            p_w = torch.zeros(n, hidden.shape[1], dtype=dtype, device=hidden.device)  # (P ∘ C) · W
            for v0 in range(0, vocab, cols_max):
                v1 = min(v0 + cols_max, vocab)
                w = weight[v0:v1]
                tile = _project(
                    h, w, None if bias is None else bias[v0:v1], tiling, tile_buf[: n * (v1 - v0)].view(n, -1)
                )
                if cap_buf is not None:
                    # d softcap·tanh(u/softcap) / du = 1 − tanh² = 1 − (logit/softcap)²
                    dcap = torch.div(tile, tiling.softcap, out=cap_buf[: n * (v1 - v0)].view(n, -1))
                    dcap.square_().neg_().add_(1.0)
                    in_tile, cols = _label_columns(y, v0, v1 - v0)
                    label_coef = torch.where(in_tile, label_coef * dcap[row_index, cols], label_coef)
                p = tile.sub_(lse[start:stop, None]).exp_()
                if cap_buf is not None:
                    p.mul_(dcap)
                p_op = p.to(operand_dtype)
                if grad_h is not None:
                    _matmul_(p_w, p_op, w)
                if grad_w is not None:
                    _matmul_(grad_w[v0:v1], p_op.t(), g_h, alpha=-1.0)
                if grad_b is not None:
                    grad_b[v0:v1].addmv_(p.t(), g, alpha=-1.0)
            if grad_h is not None:
                grad_h[start:stop] = label_coef[:, None] * weight.index_select(0, y).to(dtype) - g[:, None] * p_w
            if grad_w is not None:
                grad_w.index_add_(0, y, label_coef[:, None] * h_wide)
            if grad_b is not None:
                grad_b.index_add_(0, y, label_coef)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        ) + _NO_GRADS
