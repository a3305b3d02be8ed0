"""Running Hugging Face causal LMs on one collated batch and scoring its sequences.

A batch (from the Rust collator) has the same keys for the padded, packed and shared-prompt layouts.
What differs is who may attend to whom, which the batch states per token:

    token i may attend token j  iff  same row, segment_ids[i] == segment_ids[j] >= 0, j <= i,
                                     and branch_ids[j] in (0, branch_ids[i])

(padding, segment −1, attends only to itself so no softmax row is empty). Batches without branches
(padded and packed) are sequences end to end, so models running a varlen attention implementation
(`epsdpo.attention`: segment-wise sdpa, or flash-attention) get the segment boundaries instead of a
mask. Otherwise, with eager or sdpa attention, `position_ids` alone do not keep packed sequences
apart, so any layout other than plain right-padding runs with this rule as a 4-D additive float mask
[R, 1, L, L]: the mask builders of transformers (masking_utils) return a 4-D mask unchanged, eager
attention adds it to the scores and sdpa passes it as `attn_mask`. Plain right-padding uses the
cheaper 2-D padding mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from epsdpo.attention import (
    SEGMENT_SDPA,
    VARLEN_IMPLEMENTATIONS,
    BatchBlockMask,
    flex_attention_available,
    segment_block_mask,
    segments_given,
    varlen_kwargs,
)
from epsdpo.models import AdapterFreeReference
from epsdpo.heads import split_causal_lm
from epsdpo.ops import (
    TokenLogps,
    perturbed_logps,
    perturbed_logps_from_logits,
    sequence_logps,
)

Batch = Mapping[str, Any]

# Attention implementations known to consume a 4-D additive mask as given
_MASKABLE_ATTENTION = ("eager", "sdpa", SEGMENT_SDPA)


class SequenceLogps(NamedTuple):
    """Per-sequence log-probs [2B]: chosen sequences 0..B−1, rejected B..2B−1."""

    policy: Tensor
    reference: Tensor | None
    relaxed: Tensor
    tightened: Tensor


def build_attention_mask(segment_ids: Tensor, branch_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask [R, 1, L, L]: 0 where the batch's attention rule allows, finfo(dtype).min elsewhere."""
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    br_q, br_k = branch_ids[:, :, None], branch_ids[:, None, :]
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (seg_q == seg_k) & (seg_k >= 0) & causal & ((br_k == 0) | (br_k == br_q))
    padding = segment_ids < 0
    allowed |= torch.diag_embed(padding)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _is_right_padded(segment_ids: Tensor) -> bool:
    """True when each row holds one sequence followed only by padding, where the rule above (for a
    batch without branches) is exactly causal attention with a 2-D padding mask."""
    real = segment_ids >= 0
    if bool((real[:, 1:] & ~real[:, :-1]).any()):
        return False
    first = segment_ids[:, :1]
    return bool(((segment_ids == first) | ~real).all())


_BATCH_KEYS = (
    "input_ids", "position_ids", "segment_ids", "branch_ids", "logit_index", "target_ids", "target_sequence"
)


def _to_tensors(batch: Batch, device: torch.device) -> dict[str, Any]:
    """The batch arrays this module reads, as tensors on `device` (numpy arrays are not copied on CPU),
    with the collator's facts about the batch as they are (the boundaries stay on the host)."""
    tensors: dict[str, Any] = {key: torch.as_tensor(batch[key], device=device) for key in _BATCH_KEYS}
    tensors.update({key: batch[key] for key in (*_BATCH_FACTS, _BLOCK_MASK) if key in batch})
    return tensors


def _sliding_window(config: Any) -> int | None:
    """The model's sliding-window length when any layer uses one (Mistral, Qwen2, Gemma-2 conventions)."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


# What the Rust collator states about a batch beside its arrays: what its layout means and the varlen
# boundaries. Reading them spares each forward pass the device-to-host syncs of working them out from the ids.
_BATCH_FACTS = ("branched", "right_padded", "cu_seqlens", "max_seqlen")
# Where `batch_logps` keeps the batch's flex block mask (a `BatchBlockMask`), so that the policy and the
# reference forward share one build
_BLOCK_MASK = "block_mask"


def _layout_facts(tensors: Mapping[str, Any]) -> tuple[bool, bool]:
    """(branched, right-padded): as the collator states them, or, for a batch built elsewhere, from its
    ids (two host syncs)."""
    if "branched" in tensors and "right_padded" in tensors:
        return bool(tensors["branched"]), bool(tensors["right_padded"])
    branched = bool((tensors["branch_ids"] != 0).any())
    return branched, not branched and _is_right_padded(tensors["segment_ids"])


def _backbone_inputs(model: nn.Module, tensors: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    segment_ids, branch_ids = tensors["segment_ids"], tensors["branch_ids"]
    implementation = getattr(model.config, "_attn_implementation", None)
    inputs: dict[str, Any] = {
        "input_ids": tensors["input_ids"].long(),
        "position_ids": tensors["position_ids"].long(),
    }
    branched, right_padded = _layout_facts(tensors)
    if implementation == SEGMENT_SDPA and right_padded:
        # Causal attention over whole rows is exact for the real tokens of right-padded rows, and one
        # batched unmasked call beats both a mask and a loop over segments.
        inputs["attention_mask"] = torch.ones_like(segment_ids)
    elif implementation in VARLEN_IMPLEMENTATIONS and not branched:
        inputs.update(varlen_kwargs(segment_ids, implementation, tensors.get("cu_seqlens"), tensors.get("max_seqlen")))
        # SEGMENT_SDPA's mask builder builds nothing for a call with segments (see `_run`); an all-ones
        # mask rather than None spares transformers' search of position_ids for packed sequences (a
        # host sync). Flash attention takes the varlen path only without a mask.
        inputs["attention_mask"] = None if implementation != SEGMENT_SDPA else torch.ones_like(segment_ids)
    elif right_padded:
        inputs["attention_mask"] = (segment_ids >= 0).long()
    elif implementation in _MASKABLE_ATTENTION:
        window = _sliding_window(model.config)
        if window is not None and window < segment_ids.shape[1]:
            raise NotImplementedError(
                f"the model attends through a sliding window of {window} tokens, which a mask over rows of "
                f"{segment_ids.shape[1]} does not express; use sdpa attention (run segment-wise, see "
                "epsdpo.attention) or the padded layout"
            )
        if implementation == SEGMENT_SDPA and flex_attention_available(segment_ids.device):
            shared = tensors.get(_BLOCK_MASK)
            block_mask = shared.get if shared is not None else segment_block_mask
            inputs["attention_mask"] = block_mask(segment_ids, branch_ids)
        else:
            inputs["attention_mask"] = build_attention_mask(segment_ids, branch_ids, dtype)
    else:
        raise NotImplementedError(
            f"shared-prompt batches need eager or sdpa attention (and packed batches one of those or "
            f"flash-attention), not {implementation!r}"
        )
    return inputs


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def _run(model: nn.Module, inputs: dict[str, Any]) -> Any:
    """The model called on `inputs`; a call that passes segment boundaries says so to the mask builder,
    which then builds no mask (epsdpo.attention.segments_given)."""
    scope = segments_given() if "cu_seq_lens_q" in inputs else nullcontext()
    with scope:
        return model(**inputs, use_cache=False)


def forward_hidden(backbone: nn.Module, batch: Batch) -> Tensor:
    """Final hidden states [N, H] of the positions in `batch["logit_index"]`."""
    device, dtype = _device_dtype(backbone)
    tensors = _to_tensors(batch, device)
    hidden = _run(backbone, _backbone_inputs(backbone, tensors, dtype)).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, tensors["logit_index"].long())


def _forward_logits(model: nn.Module, tensors: Mapping[str, Tensor]) -> Tensor:
    """Full-logits fallback: logits [N, V] of the scored positions via `model(...).logits`."""
    _, dtype = _device_dtype(model)
    logits = _run(model, _backbone_inputs(model, tensors, dtype)).logits
    return logits.reshape(-1, logits.shape[-1]).index_select(0, tensors["logit_index"].long())


class Scorer(nn.Module):
    """A causal LM run for one batch in a single module call.

    Every use of the model's parameters, the backbone and the head weight inside the fused kernel,
    happens inside `forward`. Wrappers that act on module calls need that: FSDP2 gathers a sharded
    root's parameters on entry and reduces their gradients after backward, and calling the backbone
    or reading the head weight from outside would bypass both. Without such a wrapper it is free.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        batch: Batch,
        mode: str,
        reference: Scorer | None = None,
        reference_output: Tensor | None = None,
        epsilon: float = 0.0,
        chunk_size: int | None = None,
        vocab_chunk_size: int | None = None,
    ) -> Tensor | TokenLogps:
        """mode "hidden" / "logits": the scored positions' final hidden states [N, H] / logits [N, V]
        (what a reference gives). mode "score" / "score_logits": per-token policy, reference, relaxed
        and tightened log-probs from this model and `reference_output` (hidden states, which need the
        `reference` scorer's head, or logits)."""
        device, _ = _device_dtype(self.model)
        tensors = _to_tensors(batch, device)
        if mode == "logits":
            return _forward_logits(self.model, tensors)
        if mode == "score_logits":
            return perturbed_logps_from_logits(
                _forward_logits(self.model, tensors), tensors["target_ids"].long(), reference_output, epsilon, chunk_size
            )
        head = split_causal_lm(self.model)
        assert head is not None, "hidden-state modes need a model whose head splits off"
        hidden = forward_hidden(head.backbone, batch)
        if mode == "hidden":
            return hidden
        ref_head = split_causal_lm(reference.model) if reference is not None else None
        return perturbed_logps(
            hidden, head.weight, tensors["target_ids"].long(),
            reference_output, None if ref_head is None else ref_head.weight, epsilon,
            bias=head.bias, ref_bias=None if ref_head is None else ref_head.bias,
            chunk_size=chunk_size, logit_scale=head.logit_scale, softcap=head.softcap,
            vocab_chunk_size=vocab_chunk_size,
        )


def _scorer_of(unit: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel wrapper runs (a `Scorer`), or the unit itself."""
    inner = getattr(unit, "module", None)
    return inner if isinstance(inner, Scorer) else unit


@contextmanager
def _parameters_gathered(module: nn.Module | None) -> Iterator[None]:
    """Keep a sharded (FSDP2) module's own parameters gathered, so another module's forward may read
    them; a no-op for anything else."""
    unshard = getattr(module, "unshard", None)
    if module is None or unshard is None:
        yield
        return
    unshard()
    try:
        yield
    finally:
        module.reshard()


def batch_logps(
    policy: nn.Module,
    reference: nn.Module | AdapterFreeReference | None,
    batch: Batch,
    epsilon: float,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
) -> SequenceLogps:
    """Per-sequence policy (with gradient), reference, relaxed and tightened log-probs of a batch.

    The reference runs first, under no_grad. Pass `reference=None` when reference log-probs come from
    elsewhere (then ε must be 0), or an `AdapterFreeReference` to score the reference with the policy's
    own adapters switched off. Models may be given as they are or as (possibly sharded) `Scorer`s.
    With ε = 0 no perturbation work is done. Models whose head cannot be split off
    (`split_causal_lm` returns None), or whose heads transform logits differently, are scored from
    full logits instead. Chunk sizes: see `epsdpo.ops.perturbed_logps`.
    """
    # Converted once: the scorers and the backbones below then reuse these tensors as they are, and
    # the block mask built for them (shared-prompt batches on CUDA) by the first forward.
    batch = {**_to_tensors(batch, _device_dtype(policy)[0]), "num_sequences": batch["num_sequences"],
             _BLOCK_MASK: BatchBlockMask()}
    reference_scope = nullcontext
    if isinstance(reference, AdapterFreeReference):
        reference, reference_scope = reference.policy, reference.disabled
    policy = policy if isinstance(_scorer_of(policy), Scorer) else Scorer(policy)
    if reference is not None and not isinstance(reference, Scorer):
        reference = Scorer(reference)
    policy_head = split_causal_lm(_scorer_of(policy).model)
    ref_head = split_causal_lm(reference.model) if reference is not None else None
    splittable = policy_head is not None and (reference is None or (
        ref_head is not None
        and (ref_head.logit_scale, ref_head.softcap) == (policy_head.logit_scale, policy_head.softcap)
    ))
    reference_output = None
    if reference is not None:
        with torch.no_grad(), reference_scope():
            reference_output = reference(batch, "hidden" if splittable else "logits")
    if splittable:
        with _parameters_gathered(reference):  # the kernel reads the reference head weight
            tokens = policy(batch, "score", reference, reference_output, epsilon, chunk_size, vocab_chunk_size)
    else:
        tokens = policy(batch, "score_logits", None, reference_output, epsilon, chunk_size)

    target_sequence, num_sequences = batch["target_sequence"], int(batch["num_sequences"])

    def reduce(values: Tensor | None) -> Tensor | None:
        return None if values is None else sequence_logps(values, target_sequence, num_sequences)

    return SequenceLogps(*(reduce(values) for values in tokens))
