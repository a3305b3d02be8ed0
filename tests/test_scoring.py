"""epsdpo.scoring on tiny random Hugging Face models: masks, layouts, head variants, fallback."""

from __future__ import annotations

import layout_oracle
import naive_epsdpo as naive
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    GraniteConfig,
    LlamaConfig,
    PhiConfig,
)

from epsdpo.attention import SEGMENT_SDPA, segment_boundaries, use_segment_attention
from epsdpo.scoring import batch_logps, build_attention_mask, forward_hidden
from epsdpo.heads import split_causal_lm

VOCAB = 61
EPSILON = 0.2
# (prompt, chosen, rejected); lengths differ so padding and packing both matter
PAIRS = [
    ([5, 9, 2], [7, 7, 30, 1], [12, 40]),
    ([3, 44, 8, 19, 21], [6], [33, 2, 2, 50, 17]),
    ([11], [25, 26, 27], [59, 3, 14]),
]
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny(config, seed, attn="sdpa"):
    """attn: a transformers implementation, or SEGMENT_SDPA (built as sdpa, then switched)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa" if attn == SEGMENT_SDPA else attn)
    if attn == SEGMENT_SDPA:
        assert use_segment_attention(model)
    with torch.no_grad():  # random init is near-uniform; widen it so log-probs differ visibly
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def build_batch(pairs, layout, capacity=12):
    """The batch contract written out in pure Python (tests/layout_oracle.py), independent of Rust."""
    batch = layout_oracle.collate(pairs, layout, capacity=capacity)
    batch["num_sequences"] = 2 * len(pairs)
    return batch


def one_by_one(policy, reference, pairs, epsilon):
    """Ground truth: every sequence run alone, unpadded, scored from full logits."""
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    out = {f: [] for f in ("policy", "reference", "relaxed", "tightened")}
    for p, comp in seqs:
        ids = torch.tensor([p + comp])
        with torch.no_grad():
            f = policy(ids).logits[0, len(p) - 1 : -1].double()
            r = reference(ids).logits[0, len(p) - 1 : -1].double()
        for k, v in naive.token_logps(f, r, torch.tensor(comp), epsilon).items():
            out[k].append(v.sum())
    return {k: torch.stack(v) for k, v in out.items()}


def assert_matches(got, want, tol=1e-5):
    for field, values in want.items():
        torch.testing.assert_close(getattr(got, field).double(), values, rtol=tol, atol=tol, msg=field)


def test_attention_mask_follows_the_rule():
    rng = np.random.default_rng(0)
    segment_ids = torch.tensor(rng.integers(-1, 3, (3, 9)), dtype=torch.int32)
    branch_ids = torch.tensor(rng.integers(0, 3, (3, 9)), dtype=torch.int8)
    mask = build_attention_mask(segment_ids, branch_ids, torch.float32)
    assert mask.shape == (3, 1, 9, 9)
    low = torch.finfo(torch.float32).min
    for r in range(3):
        for i in range(9):
            for j in range(9):
                si, sj = int(segment_ids[r, i]), int(segment_ids[r, j])
                bi, bj = int(branch_ids[r, i]), int(branch_ids[r, j])
                allowed = si == sj >= 0 and j <= i and bj in (0, bi)
                if si < 0:
                    allowed = i == j
                assert mask[r, 0, i, j].item() == (0.0 if allowed else low), (r, i, j)


@pytest.mark.parametrize("attn", ["sdpa", "eager", SEGMENT_SDPA])
def test_layouts_give_the_same_sequence_logps(attn):
    config = LlamaConfig(**SMALL, tie_word_embeddings=False)
    policy, reference = tiny(config, 0, attn), tiny(config, 1, attn)
    want = one_by_one(policy, reference, PAIRS, EPSILON)
    batches = {layout: build_batch(PAIRS, layout) for layout in ("padded", "packed", "shared_prompt")}
    # The packed batch must really share rows, or this would test padding twice
    assert batches["packed"]["input_ids"].shape[0] < 2 * len(PAIRS)
    for layout, batch in batches.items():
        assert_matches(batch_logps(policy, reference, batch, EPSILON, chunk_size=4, vocab_chunk_size=16), want)


@pytest.mark.parametrize("attn", ["sdpa", SEGMENT_SDPA])
def test_layouts_give_the_same_gradients(attn):
    config = LlamaConfig(**SMALL, tie_word_embeddings=False)
    policy, reference = tiny(config, 0, attn), tiny(config, 1, attn)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0])
    grads = {}
    for layout in ("padded", "packed", "shared_prompt"):
        policy.zero_grad()
        out = batch_logps(policy, reference, build_batch(PAIRS, layout), EPSILON, chunk_size=4)
        (out.policy * weights).sum().backward()
        grads[layout] = [p.grad.clone() for p in policy.parameters()]
    for layout in ("packed", "shared_prompt"):
        for a, b in zip(grads[layout], grads["padded"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_right_padded_batches_use_a_2d_mask_that_matches_the_4d_rule():
    config = LlamaConfig(**SMALL)
    model = tiny(config, 2)
    batch = build_batch(PAIRS, "padded")
    hidden = forward_hidden(model.base_model, batch)
    mask = build_attention_mask(torch.as_tensor(batch["segment_ids"]), torch.as_tensor(batch["branch_ids"]),
                                torch.float32)
    full = model.base_model(input_ids=torch.as_tensor(batch["input_ids"]), attention_mask=mask,
                            position_ids=torch.as_tensor(batch["position_ids"])).last_hidden_state
    expected = full.reshape(-1, full.shape[-1])[torch.as_tensor(batch["logit_index"])]
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


def test_segment_boundaries_are_the_runs_of_each_row():
    rng = np.random.default_rng(3)
    for _ in range(20):
        rows, length = rng.integers(1, 5), rng.integers(1, 12)
        segment_ids = torch.tensor(rng.integers(-1, 3, (rows, length)), dtype=torch.int32)
        expected = [0]
        for r in range(rows):
            for i in range(1, length):
                if segment_ids[r, i] != segment_ids[r, i - 1]:
                    expected.append(r * length + i)
            expected.append((r + 1) * length)
        assert segment_boundaries(segment_ids).tolist() == expected


def test_segment_attention_honours_a_sliding_window():
    from transformers import MistralConfig

    config = MistralConfig(**SMALL, sliding_window=3)
    policy, reference = tiny(config, 0, SEGMENT_SDPA), tiny(config, 1, SEGMENT_SDPA)
    want = one_by_one(policy, reference, PAIRS, EPSILON)
    assert_matches(batch_logps(policy, reference, build_batch(PAIRS, "packed"), EPSILON), want)
    # The 4-D mask knows no windows: refused rather than silently attending too far
    with pytest.raises(NotImplementedError, match="sliding window"):
        batch_logps(tiny(config, 0), None, build_batch(PAIRS, "packed"), 0.0)


def test_segment_attention_without_segments_is_sdpa():
    """Generation and evaluation call the switched model with ordinary padding masks."""
    config = LlamaConfig(**SMALL)
    plain, switched = tiny(config, 4), tiny(config, 4, SEGMENT_SDPA)
    ids = torch.tensor([[0, 0, 5, 9, 2, 7], [3, 44, 8, 19, 21, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(switched(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)


HEADS = {
    "llama_tied": (LlamaConfig(**SMALL, tie_word_embeddings=True), dict(bias=False, scale=1.0, softcap=None)),
    "llama_untied": (LlamaConfig(**SMALL, tie_word_embeddings=False), dict(bias=False, scale=1.0, softcap=None)),
    "phi_bias": (PhiConfig(**SMALL), dict(bias=True, scale=1.0, softcap=None)),
    "cohere_scale": (CohereConfig(**SMALL, logit_scale=0.25), dict(bias=False, scale=0.25, softcap=None)),
    "granite_scaling": (GraniteConfig(**SMALL, logits_scaling=4.0), dict(bias=False, scale=0.25, softcap=None)),
    "gemma2_softcap": (
        Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=2.0),
        dict(bias=False, scale=1.0, softcap=2.0),
    ),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_head_variants_match_full_logits(name):
    config, expected = HEADS[name]
    policy, reference = tiny(config, 3, "eager"), tiny(config, 4, "eager")
    spec = split_causal_lm(policy)
    assert spec is not None
    assert (spec.bias is not None, spec.logit_scale, spec.softcap) == (
        expected["bias"], expected["scale"], expected["softcap"]
    )
    tied = spec.weight is policy.get_input_embeddings().weight
    assert tied == bool(config.tie_word_embeddings)
    want = one_by_one(policy, reference, PAIRS, EPSILON)
    batch = build_batch(PAIRS, "shared_prompt")
    assert_matches(batch_logps(policy, reference, batch, EPSILON, chunk_size=5), want)


def test_unsplittable_models_fall_back_to_full_logits():
    config = LlamaConfig(**SMALL)
    policy, reference = tiny(config, 5), tiny(config, 6)
    want = one_by_one(policy, reference, PAIRS, EPSILON)
    # A logit multiplier this module does not model (Llama itself ignores it)
    policy.config.output_multiplier = 2.0
    assert split_causal_lm(policy) is None
    out = batch_logps(policy, reference, build_batch(PAIRS, "packed"), EPSILON)
    assert_matches(out, want)
    out.policy.sum().backward()
    assert policy.lm_head.weight.grad is not None


def test_dpo_without_a_reference_model():
    config = LlamaConfig(**SMALL)
    policy, reference = tiny(config, 7), tiny(config, 8)
    want = one_by_one(policy, reference, PAIRS, 0.0)
    out = batch_logps(policy, None, build_batch(PAIRS, "packed"), 0.0)
    assert out.reference is None
    torch.testing.assert_close(out.policy.double(), want["policy"], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.relaxed, out.policy.detach()) and torch.equal(out.tightened, out.policy.detach())


def test_rust_collator_layouts_agree():
    epsdpo = pytest.importorskip("epsdpo")
    store = epsdpo.PreferenceStore(vocab_size=VOCAB)
    for p, c, r in PAIRS:
        store.add_pair(p, c, r)
    config = LlamaConfig(**SMALL)
    policy, reference = tiny(config, 9), tiny(config, 10)
    want = one_by_one(policy, reference, PAIRS, EPSILON)
    for layout in ("padded", "packed", "shared_prompt"):
        batch = epsdpo.Collator(layout, capacity=12)(store, [0, 1, 2])
        assert_matches(batch_logps(policy, reference, batch, EPSILON), want)


def test_flash_attention_models_get_varlen_arguments_instead_of_a_mask():
    """flash-attention is not installed here; check the arguments its varlen path reads."""
    from types import SimpleNamespace

    from epsdpo.scoring import _backbone_inputs

    batch = build_batch(PAIRS, "packed")
    tensors = {k: torch.as_tensor(v) for k, v in batch.items() if k != "num_sequences"}
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    inputs = _backbone_inputs(model, tensors, torch.float32)
    assert inputs["attention_mask"] is None
    cu = inputs["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and inputs["cu_seq_lens_k"] is cu
    assert cu.tolist() == segment_boundaries(tensors["segment_ids"]).tolist()
    assert inputs["max_length_q"] == int((cu[1:] - cu[:-1]).max())
    # positions restart in every segment, as flash-attention's rotary embedding expects
    flat_positions = inputs["position_ids"].reshape(-1)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if int(tensors["segment_ids"].reshape(-1)[start]) >= 0:
            assert flat_positions[start:end].tolist() == list(range(end - start))
    # shared-prompt rows branch, which no varlen call expresses
    shared = build_batch(PAIRS, "shared_prompt")
    with pytest.raises(NotImplementedError, match="shared-prompt"):
        _backbone_inputs(model, {k: torch.as_tensor(v) for k, v in shared.items() if k != "num_sequences"}, torch.float32)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_path_equals_the_4d_mask_for_shared_prompt_batches():
    """The flex_attention path that shared-prompt batches take on CUDA, run forward-only here (flex
    has no CPU backward): the same hidden states as the 4-D mask, padding rows aside."""
    from epsdpo.attention import segment_block_mask

    model = tiny(LlamaConfig(**SMALL), 0, attn=SEGMENT_SDPA)
    batch = build_batch(PAIRS, "shared_prompt", capacity=16)
    ids, positions = (torch.as_tensor(batch[k]).long() for k in ("input_ids", "position_ids"))
    segment_ids, branch_ids = torch.as_tensor(batch["segment_ids"]), torch.as_tensor(batch["branch_ids"])
    assert (branch_ids != 0).any()
    with torch.no_grad():
        masked = model.model(input_ids=ids, position_ids=positions,
                             attention_mask=build_attention_mask(segment_ids, branch_ids, torch.float32)).last_hidden_state
        flex = model.model(input_ids=ids, position_ids=positions,
                           attention_mask=segment_block_mask(segment_ids, branch_ids)).last_hidden_state
    real = segment_ids >= 0
    torch.testing.assert_close(flex[real], masked[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt"])
def test_rust_batches_carry_their_layout_so_no_forward_works_it_out(layout, monkeypatch):
    """The collator's cu_seqlens are the segment boundaries, and a forward pass reads them and the
    layout's properties instead of recomputing both (which costs device syncs)."""
    import epsdpo
    import epsdpo.scoring as scoring

    store = epsdpo.PreferenceStore(vocab_size=VOCAB)
    for pair in PAIRS:
        store.add_pair(*pair)
    batch = epsdpo.Collator(layout, capacity=16)(store, np.arange(len(PAIRS)))
    segment_ids = torch.as_tensor(batch["segment_ids"])
    torch.testing.assert_close(torch.as_tensor(batch["cu_seqlens"]), segment_boundaries(segment_ids))
    policy, reference = tiny(LlamaConfig(**SMALL), 0, attn=SEGMENT_SDPA), tiny(LlamaConfig(**SMALL), 1)
    want = batch_logps(policy, reference, {k: v for k, v in batch.items() if k not in ("branched", "right_padded", "cu_seqlens")}, EPSILON)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the batch's layout was worked out again")

    monkeypatch.setattr(scoring, "_is_right_padded", forbidden)
    monkeypatch.setattr("epsdpo.attention.segment_boundaries", forbidden)
    got = batch_logps(policy, reference, batch, EPSILON)
    for field in ("policy", "reference", "relaxed", "tightened"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-6, atol=1e-6)
