"""Which attention path a batch takes, and what each path is handed (epsdpo.attention).

The CUDA-only pieces are stood in for on CPU: torch's varlen kernel by `StandInVarlen` (its
signature, sdpa on each segment inside, and its refusal of mixed or full-precision q, k, v), and
torch.compile by a spy that records what was compiled and counts the calls. The device gates are
opened to CPU for these tests only; what each path computes is compared with the padded layout or
with each sequence run alone.
"""

from __future__ import annotations

import layout_oracle
import naive_epsdpo as naive
import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from epsdpo import attention, scoring
from epsdpo.attention import SEGMENT_SDPA, _sdpa_per_segment, use_segment_attention
from epsdpo.scoring import SequenceLogps, batch_logps
from test_scoring import EPSILON, PAIRS, SMALL  # its pairs: several are longer than the sliding windows below

HALF = (torch.float16, torch.bfloat16)


class StandInVarlen:
    """`torch.nn.attention.varlen.varlen_attn` (torch 2.15's signature) for CPU: sdpa on each segment,
    with flash-attention's window convention (query i sees keys i − left … i + right, −1 meaning no
    limit). Like the real kernel it computes in the dtype it is given, so it refuses q, k, v that do
    not share one of the dtypes it runs in."""

    def __init__(self, dtypes: tuple[torch.dtype, ...] = HALF) -> None:
        self.dtypes = dtypes
        self.windows: list[tuple[int, int]] = []

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        if not query.dtype == key.dtype == value.dtype or query.dtype not in self.dtypes:
            raise RuntimeError(f"varlen kernel: q, k, v must share one of {self.dtypes}, got "
                               f"{query.dtype}, {key.dtype}, {value.dtype}")
        bounds = cu_seq_q.tolist()
        spans = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        if cu_seq_k.tolist() != bounds or max(spans) > min(max_q, max_k) or bounds[-1] != query.shape[0]:
            raise RuntimeError(f"varlen kernel: boundaries {bounds} do not fit max {max_q}, {max_k} "
                               f"or {query.shape[0]} tokens")
        self.windows.append(tuple(window_size))
        left, right = window_size
        outputs = []
        with torch.autocast(query.device.type, enabled=False):
            for start, end in zip(bounds[:-1], bounds[1:]):
                index = torch.arange(end - start)
                behind = index[:, None] - index[None, :]  # how far key j lies behind query i
                allowed = torch.ones_like(behind, dtype=torch.bool)
                if left >= 0:
                    allowed &= behind <= left
                if right >= 0:
                    allowed &= behind >= -right
                q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=enable_gqa)
                outputs.append(out.transpose(0, 1))
        return torch.cat(outputs)


def install_varlen(monkeypatch, kernel: StandInVarlen) -> None:
    """Make `kernel` the varlen kernel attention.py calls, runnable on CPU in the kernel's dtypes."""
    monkeypatch.setattr(attention, "_varlen_attn", lambda: kernel)
    monkeypatch.setattr(attention, "_VARLEN_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention, "_VARLEN_DTYPES", kernel.dtypes)


def spy_attention(monkeypatch) -> list[tuple[object, bool]]:
    """Record (attention_mask, whether segment boundaries came) for every SEGMENT_SDPA layer call."""
    attention.register()
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs.get("cu_seq_lens_q") is not None))
        return attention._segment_sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, SEGMENT_SDPA, spy)
    return seen


def tiny(config, seed):
    """A random model running SEGMENT_SDPA, with float32 weights widened so log-probs differ visibly."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert use_segment_attention(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def build_batch(layout, pairs=PAIRS):
    batch = layout_oracle.collate(pairs, layout, capacity=12)
    batch["num_sequences"] = 2 * len(pairs)
    return batch


def one_by_one(policy, reference, pairs=PAIRS):
    """Ground truth: every sequence run alone, unpadded and without segments, from full logits."""
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    out = {field: [] for field in SequenceLogps._fields}
    for prompt, completion in seqs:
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            f = policy(ids).logits[0, len(prompt) - 1 : -1].double()
            r = reference(ids).logits[0, len(prompt) - 1 : -1].double()
        for field, values in naive.token_logps(f, r, torch.tensor(completion), EPSILON).items():
            out[field].append(values.sum())
    return {field: torch.stack(values) for field, values in out.items()}


def assert_matches(got: SequenceLogps, want, tol=1e-5):
    for field, values in want.items():
        torch.testing.assert_close(getattr(got, field).double(), values, rtol=tol, atol=tol, msg=field)


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config])
def test_varlen_kernel_runs_under_autocast_given_q_k_v_in_the_autocast_dtype(config_class, monkeypatch):
    """bf16 autocast over float32 weights (the normal precision mode): RoPE hands attention float32 q, k
    and a bf16 v, and the kernel (a custom op with no autocast rule) must get all three in bf16."""
    kernel = StandInVarlen()
    install_varlen(monkeypatch, kernel)
    config = config_class(**SMALL)
    policy, reference = tiny(config, 0), tiny(config, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded = batch_logps(policy, reference, build_batch("padded"), EPSILON)
        assert kernel.windows == []  # right-padded rows take one batched sdpa call, no segments
        packed = batch_logps(policy, reference, build_batch("packed"), EPSILON)
    # one call per layer of each forward: the reference's, then the policy's
    assert len(kernel.windows) == 2 * config.num_hidden_layers
    # Same sequences, both computed in bf16 (sdpa under autocast casts as the kernel's caller does): they
    # agree to bf16's 2⁻⁸ relative precision, well inside the ~0.6 that separates policy from reference
    for field in SequenceLogps._fields:
        torch.testing.assert_close(getattr(packed, field).float(), getattr(padded, field).float(),
                                   rtol=2**-8, atol=2e-2, msg=field)
    packed.policy.sum().backward()  # the casts are differentiable: float32 weights get float32 gradients
    for name, parameter in policy.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name


def test_varlen_kernel_window_is_transformers_sliding_window(monkeypatch):
    """transformers' window W lets token i see (i − W, i]: the kernel's left window is W − 1. Run in
    float32 (the stand-in is let take it) so the comparison with each sequence alone is exact."""
    kernel = StandInVarlen(dtypes=(torch.float32,))
    install_varlen(monkeypatch, kernel)
    config = MistralConfig(**SMALL, sliding_window=3)
    policy, reference = tiny(config, 0), tiny(config, 1)
    assert max(len(p) + max(len(c), len(r)) for p, c, r in PAIRS) > 3  # the window cuts some sequences
    got = batch_logps(policy, reference, build_batch("packed"), EPSILON)
    assert_matches(got, one_by_one(policy, reference))
    assert kernel.windows == [(config.sliding_window - 1, 0)] * (2 * config.num_hidden_layers)


def test_varlen_kernel_takes_half_precision_weights_without_autocast(monkeypatch):
    """FSDP's mixed precision gathers bf16 parameters and enters no autocast: q, k, v arrive bf16."""
    kernel = StandInVarlen()
    install_varlen(monkeypatch, kernel)
    config = LlamaConfig(**SMALL)
    policy = tiny(config, 0).to(torch.bfloat16)
    batch_logps(policy, None, build_batch("packed"), 0.0)
    assert len(kernel.windows) == config.num_hidden_layers


def test_varlen_kernel_is_skipped_where_it_cannot_run(monkeypatch):
    """Dropout while training, or a dtype the kernel lacks (float32 without autocast): the per-segment
    loop runs instead and the kernel is never handed the batch."""
    kernel = StandInVarlen()
    install_varlen(monkeypatch, kernel)
    loops = []
    monkeypatch.setattr(attention, "_sdpa_per_segment",
                        lambda *args: loops.append(args[0].dtype) or _sdpa_per_segment(*args))
    config = LlamaConfig(**SMALL)
    policy, reference = tiny(config, 0), tiny(config, 1)
    assert_matches(batch_logps(policy, reference, build_batch("packed"), EPSILON), one_by_one(policy, reference))
    assert kernel.windows == [] and len(loops) == 2 * config.num_hidden_layers
    dropped = tiny(LlamaConfig(**SMALL, attention_dropout=0.5), 0).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch_logps(dropped, None, build_batch("packed"), 0.0)
    assert kernel.windows == [] and len(loops) == 3 * config.num_hidden_layers


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_is_built_compiled_once_per_batch(monkeypatch):
    """Shared-prompt batches on CUDA attend through flex with a block mask: built by a compiled
    create_block_mask (eager, it materialises the B×1×L×L mask), once per batch for the policy and
    the reference forward and all their layers. torch.compile is a spy that runs the function eagerly
    and counts its calls; the gates are opened to CPU as on CUDA."""
    calls: dict[str, int] = {}

    def spy_compile(function, *args, **kwargs):
        calls.setdefault(function.__name__, 0)

        def run(*a, **k):
            calls[function.__name__] += 1
            return function(*a, **k)

        return run

    monkeypatch.setattr(torch, "compile", spy_compile)
    monkeypatch.setattr(attention, "_compiled_create_block_mask", None)
    monkeypatch.setattr(attention, "_compiled_flex", None)
    monkeypatch.setattr(attention, "_compiles_flex", lambda device: True)
    monkeypatch.setattr(scoring, "flex_attention_available", lambda device: True)
    config = LlamaConfig(**SMALL)
    policy, reference = tiny(config, 0), tiny(config, 1)
    batches = [PAIRS, PAIRS[1:]]
    with torch.no_grad():  # flex has no CPU backward
        results = [batch_logps(policy, reference, build_batch("shared_prompt", pairs), EPSILON) for pairs in batches]
    assert calls.get("create_block_mask") == len(batches)
    # the mask was really used: every layer of both forwards of both batches ran flex
    assert calls.get("flex_attention") == len(batches) * 2 * config.num_hidden_layers
    want = one_by_one(policy, reference)  # chosen answers 0..2, then rejected 3..5
    assert_matches(results[0], want)
    assert_matches(results[1], {field: values[[1, 2, 4, 5]] for field, values in want.items()})


def test_shared_prompt_batches_on_cpu_keep_the_4d_mask(monkeypatch):
    """Where flex does not run (CPU), no block mask is built and every layer gets the 4-D mask."""
    from torch.nn.attention import flex_attention

    def no_block_mask(*args, **kwargs):
        raise AssertionError("a block mask was built on CPU")

    monkeypatch.setattr(flex_attention, "create_block_mask", no_block_mask)
    seen = spy_attention(monkeypatch)
    config = LlamaConfig(**SMALL)
    policy, reference = tiny(config, 0), tiny(config, 1)
    got = batch_logps(policy, reference, build_batch("shared_prompt"), EPSILON)
    assert len(seen) == 2 * config.num_hidden_layers
    assert all(isinstance(mask, torch.Tensor) and mask.dim() == 4 for mask, _ in seen)
    assert_matches(got, one_by_one(policy, reference))


def test_sliding_window_model_gets_no_mask_when_segments_are_given(monkeypatch):
    """With segment boundaries attention reads no mask, so none may be built: transformers would build a
    [R, 1, L, L] window mask for a sliding-window model whose rows outgrow the window. Without them
    (generation, evaluation, each sequence alone below) sdpa's window mask is still built."""
    seen = spy_attention(monkeypatch)
    config = MistralConfig(**SMALL, sliding_window=3)
    policy, reference = tiny(config, 0), tiny(config, 1)
    batch = build_batch("packed")
    assert batch["input_ids"].shape[1] > config.sliding_window
    got = batch_logps(policy, reference, batch, EPSILON)
    assert len(seen) == 2 * config.num_hidden_layers
    assert all(has_segments and mask is None for mask, has_segments in seen), [
        (None if mask is None else tuple(mask.shape), has_segments) for mask, has_segments in seen]
    seen.clear()
    want = one_by_one(policy, reference)
    assert seen and all(not has_segments and isinstance(mask, torch.Tensor) for mask, has_segments in seen)
    assert_matches(got, want)
