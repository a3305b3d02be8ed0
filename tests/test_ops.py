"""epsdpo.ops against the naive full-logits ε-DPO of tests/naive_epsdpo.py."""

from __future__ import annotations

import naive_epsdpo as naive
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epsdpo.loss import kl_steps, pair_log_ratio
from epsdpo.ops import (
    perturbed_logps,
    perturbed_logps_from_logits,
    reference_logps,
    sequence_logps,
)

FIELDS = ("policy", "reference", "relaxed", "tightened")


def make_case(seed, n, h, v, *, bias=False, dtype=torch.float32, scale=1.0, softcap=None, sequences=4):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    hidden, weight = randn(n, h), randn(v, h, std=0.5)
    head_bias = randn(v) if bias else None
    # The reference is the policy plus noise, as after some training
    return {
        "hidden": hidden.requires_grad_(),
        "weight": weight.requires_grad_(),
        "bias": head_bias.requires_grad_() if bias else None,
        "ref_hidden": hidden.detach() + randn(n, h, std=0.3),
        "ref_weight": weight.detach() + randn(v, h, std=0.1),
        "ref_bias": head_bias.detach() + randn(v, std=0.1) if bias else None,
        "labels": torch.randint(0, v, (n,), generator=g),
        "target_sequence": torch.randint(0, sequences, (n,), generator=g),
        "scale": scale,
        "softcap": softcap,
    }


def ours(case, epsilon, chunk_size=5, vocab_chunk_size=7):
    return perturbed_logps(
        case["hidden"], case["weight"], case["labels"], case["ref_hidden"], case["ref_weight"], epsilon,
        bias=case["bias"], ref_bias=case["ref_bias"], chunk_size=chunk_size, logit_scale=case["scale"],
        softcap=case["softcap"], vocab_chunk_size=vocab_chunk_size,
    )


def reference_impl(case, epsilon):
    policy_logits = naive.head_logits(case["hidden"], case["weight"], case["bias"], case["scale"], case["softcap"])
    ref_logits = naive.head_logits(
        case["ref_hidden"], case["ref_weight"], case["ref_bias"], case["scale"], case["softcap"]
    )
    return naive.token_logps(policy_logits, ref_logits, case["labels"], epsilon)


head_variants = st.sampled_from([(False, 1.0, None), (True, 1.0, None), (False, 0.5, None), (True, 2.0, 3.0)])


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 23),
    v=st.integers(2, 40),
    chunk=st.integers(1, 9),
    vocab_chunk=st.integers(1, 50),
    epsilon=st.sampled_from([0.01, 0.1, 0.5, -0.2]),
    head=head_variants,
)
def test_per_sequence_logps_match_naive_float32(seed, n, v, chunk, vocab_chunk, epsilon, head):
    bias, scale, softcap = head
    case = make_case(seed, n, 6, v, bias=bias, scale=scale, softcap=softcap)
    got = ours(case, epsilon, chunk, vocab_chunk)
    want = reference_impl(case, epsilon)
    for field in FIELDS:
        got_seq = sequence_logps(getattr(got, field), case["target_sequence"], 4)
        want_seq = naive.per_sequence(want[field], case["target_sequence"], 4)
        torch.testing.assert_close(got_seq, want_seq, rtol=1e-5, atol=1e-5, msg=field)


@pytest.mark.parametrize("head", [(False, 1.0, None), (True, 1.7, None), (True, 1.0, 2.5), (False, 0.6, 4.0)])
def test_gradcheck_float64(head):
    bias, scale, softcap = head
    case = make_case(3, 5, 3, 7, bias=bias, dtype=torch.float64, scale=scale, softcap=softcap)
    upstream = torch.randn(5, dtype=torch.float64)
    inputs = [case["hidden"], case["weight"]] + ([case["bias"]] if bias else [])

    def policy_term(hidden, weight, *maybe_bias):
        out = perturbed_logps(
            hidden, weight, case["labels"], case["ref_hidden"], case["ref_weight"], 0.3,
            bias=maybe_bias[0] if maybe_bias else None, ref_bias=case["ref_bias"],
            chunk_size=2, logit_scale=scale, softcap=softcap, vocab_chunk_size=3,
        )
        return (out.policy * upstream).sum()

    assert torch.autograd.gradcheck(policy_term, inputs)


@pytest.mark.parametrize("head", [(False, 1.0, None), (True, 0.8, 3.0)])
def test_gradients_match_naive_autograd(head):
    bias, scale, softcap = head
    case = make_case(11, 40, 8, 90, bias=bias, dtype=torch.float64, scale=scale, softcap=softcap)
    upstream = torch.randn(40, dtype=torch.float64)
    params = [case["hidden"], case["weight"]] + ([case["bias"]] if bias else [])
    got = torch.autograd.grad((ours(case, 0.2, 16, 32).policy * upstream).sum(), params)
    want = torch.autograd.grad((reference_impl(case, 0.2)["policy"] * upstream).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_chunk_size_invariance():
    case = make_case(5, 37, 8, 101, bias=True, scale=1.3, softcap=6.0)
    upstream = torch.randn(37)
    params = [case["hidden"], case["weight"], case["bias"]]
    results = []
    for chunk, vocab_chunk in [(37, 101), (1, 1), (4, 10), (16, 64), (100, 1000)]:
        out = ours(case, 0.1, chunk, vocab_chunk)
        grads = torch.autograd.grad((out.policy * upstream).sum(), params)
        results.append((out, grads))
    base_out, base_grads = results[0]
    for out, grads in results[1:]:
        for field in FIELDS:
            torch.testing.assert_close(getattr(out, field), getattr(base_out, field), rtol=1e-6, atol=1e-6)
        for a, b in zip(grads, base_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_epsilon_zero_skips_the_perturbation():
    case = make_case(7, 12, 6, 30)
    out = ours(case, 0.0)
    assert torch.equal(out.relaxed, out.policy.detach())
    assert torch.equal(out.tightened, out.policy.detach())
    torch.testing.assert_close(out.reference, reference_impl(case, 0.0)["reference"], rtol=1e-6, atol=1e-6)
    # Without a reference head: DPO with reference log-probs from elsewhere
    alone = perturbed_logps(
        case["hidden"], case["weight"], case["labels"], None, None, 0.0, chunk_size=5, vocab_chunk_size=7
    )
    assert alone.reference is None
    assert torch.equal(alone.policy, out.policy)
    with pytest.raises(ValueError, match="reference"):
        perturbed_logps(case["hidden"], case["weight"], case["labels"], None, None, 0.1)


def test_reference_logps_and_full_logits_fallback_match_naive():
    case = make_case(9, 19, 5, 33, bias=True, scale=0.9, softcap=5.0)
    want = reference_impl(case, 0.25)
    ref = reference_logps(
        case["ref_hidden"], case["ref_weight"], case["labels"], case["ref_bias"], chunk_size=4,
        logit_scale=0.9, softcap=5.0, vocab_chunk_size=8,
    )
    torch.testing.assert_close(ref, want["reference"], rtol=1e-6, atol=1e-6)
    policy_logits = naive.head_logits(case["hidden"], case["weight"], case["bias"], 0.9, 5.0)
    ref_logits = naive.head_logits(case["ref_hidden"], case["ref_weight"], case["ref_bias"], 0.9, 5.0)
    got = perturbed_logps_from_logits(policy_logits, case["labels"], ref_logits, 0.25, chunk_size=6)
    for field in FIELDS:
        torch.testing.assert_close(getattr(got, field), want[field], rtol=1e-6, atol=1e-6, msg=field)
    # The reference logits are read, never overwritten
    unchanged = naive.head_logits(case["ref_hidden"], case["ref_weight"], case["ref_bias"], 0.9, 5.0)
    torch.testing.assert_close(ref_logits, unchanged)


def test_wide_reference_logits_stay_exact():
    # ε·range(r) ≫ 87: exp of the perturbed logits would overflow without a max pass of their own
    case = make_case(17, 16, 6, 40)
    case["ref_weight"] = case["ref_weight"] * 200.0
    got = ours(case, 0.9)
    want = reference_impl(case, 0.9)
    for field in FIELDS:
        assert torch.isfinite(getattr(got, field)).all(), field
        torch.testing.assert_close(getattr(got, field), want[field], rtol=1e-5, atol=1e-3, msg=field)


def test_bfloat16_inputs_keep_float32_statistics():
    case = make_case(13, 20, 16, 50, dtype=torch.bfloat16)
    out = ours(case, 0.1)
    assert out.policy.dtype == torch.float32 and out.relaxed.dtype == torch.float32
    # The GEMM runs in bf16, so compare with the naive result on the same bf16 logits
    want = reference_impl(case, 0.1)
    for field in FIELDS:
        torch.testing.assert_close(getattr(out, field), want[field].float(), rtol=0, atol=0.1, msg=field)
    out.policy.sum().backward()
    assert case["weight"].grad.dtype == torch.bfloat16 and torch.isfinite(case["weight"].grad.float()).all()


def test_sequence_logps_reduces_by_sequence_and_backpropagates():
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], requires_grad=True)
    seq = torch.tensor([2, 0, 2, 1, 0])
    total = sequence_logps(values, seq, 4)
    assert total.tolist() == [18.0, 8.0, 5.0, 0.0]
    (total * torch.tensor([1.0, 10.0, 100.0, 1000.0])).sum().backward()
    assert values.grad.tolist() == [100.0, 1.0, 100.0, 10.0, 1.0]


# Where z and a perturbed z are closer than this, float32 rounding may flip the strict comparison
STEP_TOLERANCE = 1e-4


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), epsilon=st.sampled_from([1e-3, 0.01, 0.1]))
def test_steps_agree_with_naive_up_to_near_ties(seed, epsilon):
    pairs = 6
    case = make_case(seed, 60, 8, 50, sequences=2 * pairs)
    got = ours(case, epsilon, 7, 16)
    want = reference_impl(case, epsilon)

    def per_pair(values, reduce):
        return pair_log_ratio(reduce(values, case["target_sequence"], 2 * pairs))

    z, zr, zt = (per_pair(getattr(got, f), sequence_logps) for f in ("policy", "relaxed", "tightened"))
    nz, nzr, nzt = (per_pair(want[f].double(), naive.per_sequence) for f in ("policy", "relaxed", "tightened"))
    ours_steps = kl_steps(z, zr, zt).tolist()
    naive_steps = naive.steps(nz.tolist(), nzr.tolist(), nzt.tolist())
    for i, (a, b) in enumerate(zip(ours_steps, naive_steps)):
        if a != b:
            gap = min(abs(nzr[i] - nz[i]), abs(nz[i] - nzt[i]))
            assert gap < STEP_TOLERANCE, (i, a, b, gap)


def test_steps_are_not_all_zero_on_random_heads():
    # Guards the agreement test above against passing vacuously
    case = make_case(1, 200, 8, 50, sequences=40)
    out = ours(case, 0.1)
    steps = kl_steps(*(pair_log_ratio(sequence_logps(getattr(out, f), case["target_sequence"], 40))
                       for f in ("policy", "relaxed", "tightened")))
    assert set(steps.tolist()) - {0}


# ---------------------------------------------------------------------------- the torch it needs
def test_a_torch_below_the_minimum_is_refused_in_one_line_naming_both_versions(monkeypatch):
    from epsdpo.ops import TorchTooOldError, check_torch_version

    check_torch_version()  # the installed torch passes
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    with pytest.raises(TorchTooOldError) as refused:
        check_torch_version()
    message = str(refused.value)
    assert "\n" not in message and "torch>=2.10" in message and "torch 2.9.1+cu128 is installed" in message


def test_a_torch_whose_gemms_lack_out_dtype_is_refused_whatever_its_version(monkeypatch):
    from epsdpo.ops import TorchTooOldError, check_torch_version

    real_addmm = torch.addmm

    def addmm_before_out_dtype(*args, **kwargs):  # as torch 2.7 answers
        if "out_dtype" in kwargs:
            raise TypeError("addmm() received an invalid combination of arguments - got (..., out_dtype=torch.dtype)")
        return real_addmm(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", addmm_before_out_dtype)
    with pytest.raises(TorchTooOldError, match=r"needs torch>=2\.10 .* is installed"):
        check_torch_version()


def test_importing_the_kernel_under_an_old_torch_fails_with_the_versions():
    import subprocess
    import sys

    program = "import torch; torch.__version__ = '2.8.0'; import epsdpo.ops"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "epsdpo.ops.TorchTooOldError: epsdpo needs torch>=2.10 (torch.mm/addmm with out_dtype into an fp32 "
        "accumulator); torch 2.8.0 is installed")
