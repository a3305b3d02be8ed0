"""epsdpo.loss: the step rule, per-pair β, the loss with conservative DPO smoothing, and ε = 0 as plain DPO."""

from __future__ import annotations

import math

import naive_epsdpo as naive
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import epsdpo.loss
from epsdpo.loss import epsilon_dpo_loss, kl_steps, pair_betas, pair_log_ratio
from epsdpo.ops import perturbed_logps, sequence_logps


def test_worked_example_from_the_module_docstring():
    doc = epsdpo.loss.__doc__
    assert "0.616344" in doc and "0.632344" in doc
    policy = torch.tensor([-10.0, -12.0], dtype=torch.float64)
    relaxed_z, tightened_z = torch.tensor([2.3], dtype=torch.float64), torch.tensor([1.8], dtype=torch.float64)
    z = pair_log_ratio(policy)
    assert z.tolist() == [2.0]
    steps = kl_steps(z, relaxed_z, tightened_z)
    assert steps.tolist() == [1]
    betas = pair_betas(0.1, 0.25, steps)
    assert betas.tolist() == pytest.approx([0.08])
    ref = torch.tensor([-11.0], dtype=torch.float64)
    args = (policy[:1], policy[1:], ref, ref)
    losses, chosen, rejected = epsilon_dpo_loss(*args, betas)
    assert losses.item() == pytest.approx(0.616344, abs=1e-6)
    smoothed, _, _ = epsilon_dpo_loss(*args, betas, cdpo_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.632344, abs=1e-6)
    assert chosen.item() == pytest.approx(0.08) and rejected.item() == pytest.approx(-0.08)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(*[st.integers(-2, 2)] * 3), min_size=1, max_size=20))
def test_kl_steps_follow_the_strict_rule_including_ties(triples):
    # Small integers make ties (which must give 0) common
    z, zr, zt = (torch.tensor([t[k] for t in triples], dtype=torch.float32) for k in range(3))
    got = kl_steps(z, zr, zt)
    assert got.dtype == torch.int64
    assert got.tolist() == naive.steps(z.tolist(), zr.tolist(), zt.tolist())


def test_pair_betas():
    steps = torch.tensor([1, 0, -1])
    assert pair_betas(0.1, 0.01, steps).tolist() == [0.1 / 1.01, 0.1, 0.1 / 0.99]


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-30, 30), min_size=4, max_size=4),
    beta=st.floats(0.01, 2.0),
    cdpo_smoothing=st.sampled_from([0.0, 0.1, 0.3, 0.49]),
)
def test_cdpo_smoothing_matches_the_formula(values, beta, cdpo_smoothing):
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in values)
    losses, _, _ = epsilon_dpo_loss(pc, pr, rc, rr, torch.tensor([beta], dtype=torch.float64), cdpo_smoothing)
    x = beta * ((values[0] - values[2]) - (values[1] - values[3]))
    by_hand = -(1 - cdpo_smoothing) * naive.log_sigmoid(x) - cdpo_smoothing * naive.log_sigmoid(-x)
    assert losses.item() == pytest.approx(by_hand, rel=1e-12, abs=1e-12)


def test_cdpo_smoothing_is_not_a_no_op():
    args = [torch.tensor([v], requires_grad=True) for v in (-5.0, -9.0, -6.0, -7.0)]
    betas = torch.tensor([0.5])
    plain, _, _ = epsilon_dpo_loss(*args, betas)
    smoothed, _, _ = epsilon_dpo_loss(*args, betas, cdpo_smoothing=0.2)
    assert smoothed.item() > plain.item()
    # d loss / d margin = −(1 − ls)·σ(−x) + ls·σ(x)
    (grad,) = torch.autograd.grad(smoothed.sum(), args[0])
    x = 0.5 * ((-5.0 + 6.0) - (-9.0 + 7.0))
    want = 0.5 * (-(0.8) / (1 + math.exp(x)) + 0.2 / (1 + math.exp(-x)))
    assert grad.item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError):
        epsilon_dpo_loss(*args, betas, cdpo_smoothing=0.5)


def test_rewards_use_the_pair_beta_and_are_detached():
    pc, pr = torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-3.0, -1.0], requires_grad=True)
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    betas = torch.tensor([0.5, 2.0])
    _, chosen, rejected = epsilon_dpo_loss(pc, pr, rc, rr, betas)
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 2.0]
    assert not chosen.requires_grad and not rejected.requires_grad


def test_epsilon_zero_is_exactly_dpo_loss_and_gradients():
    torch.manual_seed(0)
    n, h, v, pairs, beta = 48, 8, 40, 4, 0.1
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.5).requires_grad_()
    ref_hidden, ref_weight = hidden.detach() + 0.3 * torch.randn(n, h), weight.detach() + 0.1 * torch.randn(v, h)
    labels, seq = torch.randint(0, v, (n,)), torch.arange(n) % (2 * pairs)

    out = perturbed_logps(hidden, weight, labels, ref_hidden, ref_weight, 0.0, chunk_size=16, vocab_chunk_size=16)
    per_seq = {f: sequence_logps(getattr(out, f), seq, 2 * pairs) for f in out._fields}
    steps = kl_steps(*(pair_log_ratio(per_seq[f]) for f in ("policy", "relaxed", "tightened")))
    assert steps.tolist() == [0] * pairs
    betas = pair_betas(beta, 0.0, steps)
    assert betas.tolist() == [beta] * pairs
    pol_c, pol_r = per_seq["policy"].chunk(2)
    ref_c, ref_r = per_seq["reference"].chunk(2)
    losses, _, _ = epsilon_dpo_loss(pol_c, pol_r, ref_c, ref_r, betas)

    # Plain DPO on the same log-probs, written out
    dpo = -F.logsigmoid(beta * ((pol_c - ref_c) - (pol_r - ref_r)))
    assert torch.equal(losses, dpo)
    got = torch.autograd.grad(losses.mean(), [hidden, weight], retain_graph=True)
    want = torch.autograd.grad(dpo.mean(), [hidden, weight])
    for a, b in zip(got, want):
        assert torch.equal(a, b)

    # ... and the same loss as the naive full-logits DPO
    naive_logps = naive.token_logps(hidden @ weight.t(), ref_hidden @ ref_weight.t(), labels, 0.0)
    naive_seq = {f: naive.per_sequence(naive_logps[f], seq, 2 * pairs) for f in naive_logps}
    naive_loss, naive_steps = naive.loss(naive_seq["policy"], naive_seq["reference"], naive_seq["relaxed"],
                                         naive_seq["tightened"], beta, 0.0)
    assert naive_steps == [0] * pairs
    torch.testing.assert_close(losses.mean(), naive_loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(got, torch.autograd.grad(naive_loss, [hidden, weight])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_full_epsilon_dpo_loss_matches_naive():
    torch.manual_seed(1)
    n, h, v, pairs, beta, epsilon, ls = 90, 8, 40, 6, 0.5, 0.2, 0.1
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(v, h, dtype=torch.float64) * 0.5).requires_grad_()
    ref_hidden = hidden.detach() + 0.3 * torch.randn(n, h, dtype=torch.float64)
    ref_weight = weight.detach() + 0.1 * torch.randn(v, h, dtype=torch.float64)
    labels, seq = torch.randint(0, v, (n,)), torch.arange(n) % (2 * pairs)

    out = perturbed_logps(
        hidden, weight, labels, ref_hidden, ref_weight, epsilon, chunk_size=16, vocab_chunk_size=16
    )
    per_seq = {f: sequence_logps(getattr(out, f), seq, 2 * pairs) for f in out._fields}
    steps = kl_steps(*(pair_log_ratio(per_seq[f]) for f in ("policy", "relaxed", "tightened")))
    pol_c, pol_r = per_seq["policy"].chunk(2)
    ref_c, ref_r = per_seq["reference"].chunk(2)
    losses, _, _ = epsilon_dpo_loss(pol_c, pol_r, ref_c, ref_r, pair_betas(beta, epsilon, steps), ls)

    naive_logps = naive.token_logps(hidden @ weight.t(), ref_hidden @ ref_weight.t(), labels, epsilon)
    naive_seq = {f: naive.per_sequence(naive_logps[f], seq, 2 * pairs) for f in naive_logps}
    naive_loss, naive_steps = naive.loss(naive_seq["policy"], naive_seq["reference"], naive_seq["relaxed"],
                                         naive_seq["tightened"], beta, epsilon, ls)
    assert steps.tolist() == naive_steps and set(naive_steps) - {0}
    torch.testing.assert_close(losses.mean(), naive_loss, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(losses.mean(), [hidden, weight])
    for a, b in zip(got, torch.autograd.grad(naive_loss, [hidden, weight])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
