"""BatchSampler and KlController through Python: coverage, resume, the β rule."""

from __future__ import annotations

import numpy as np
import pytest

import epsdpo


def lengths(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(5, 400, n).astype(np.uint32), rng.integers(5, 400, n).astype(np.uint32)


@pytest.mark.parametrize("mode", ["shuffle", "length_grouped"])
def test_every_pair_once_per_epoch_across_ranks(mode):
    c, r = lengths(103)
    seen = []
    for rank in range(4):
        sampler = epsdpo.BatchSampler(c, r, 8, mode=mode, seed=3, world_size=4, rank=rank)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        seen.extend(i for b in batches for i in b.tolist())
    counts = np.bincount(seen, minlength=103)
    assert counts.min() >= 1
    # Repeats only come from padding the batch count to a multiple of the world size.
    assert counts.sum() - 103 < 4 * 8


def test_token_budget_respects_the_budget_and_padding_counts():
    c, r = lengths(200)
    sampler = epsdpo.BatchSampler(c, r, 16, mode="token_budget", max_tokens=4096, padded=True)
    for batch in sampler:
        longest = max(max(c[i], r[i]) for i in batch)
        assert 2 * len(batch) * longest <= 4096
    with pytest.raises(ValueError, match="max_tokens"):
        epsdpo.BatchSampler(c, r, 16, mode="token_budget")


def test_resume_mid_epoch_gives_the_remaining_batches():
    c, r = lengths(64)
    full = [b.tolist() for b in epsdpo.BatchSampler(c, r, 4, mode="length_grouped", seed=11)]
    first = epsdpo.BatchSampler(c, r, 4, mode="length_grouped", seed=11)
    taken = [next(first).tolist() for _ in range(5)]
    state = first.state_dict()
    resumed = epsdpo.BatchSampler(c, r, 4, mode="length_grouped", seed=11)
    resumed.load_state_dict(state)
    assert taken + [b.tolist() for b in resumed] == full
    other = epsdpo.BatchSampler(c, r, 4, mode="length_grouped", seed=12)
    with pytest.raises(epsdpo.StateError):
        other.load_state_dict(state)
    with pytest.raises(epsdpo.StateError):
        other.load_state_dict({"state": b"garbage"})


def test_kl_controller_applies_the_epsilon_dpo_rule():
    beta, eps = 0.1, 0.05
    kl = epsdpo.KlController(beta, eps)
    steps = np.array([1, 0, -1, 1], dtype=np.int8)
    np.testing.assert_allclose(kl.betas_for(steps), beta / (1 + eps * steps.astype(float)))
    # Two micro-batches of one accumulation cycle: the update uses the mean over all their pairs.
    kl.record(np.array([0, 1], dtype=np.uint64), steps[:2])
    kl.record(np.array([2, 3], dtype=np.uint64), steps[2:])
    assert kl.local_sums() == (1, 4)
    new = kl.apply_update(*kl.local_sums())
    assert new == pytest.approx(beta / (1 + eps * 0.25))
    np.testing.assert_allclose(kl.beta_history(), [beta, new])
    ledger = kl.ledger()
    assert ledger["pair_ids"].tolist() == [0, 1, 2, 3] and ledger["last_step"].tolist() == steps.tolist()
    restored = epsdpo.KlController(1.0, 0.0)
    restored.load_state_dict(kl.state_dict())
    assert restored.beta == new and restored.beta_history().tolist() == kl.beta_history().tolist()
    with pytest.raises(epsdpo.StateError):
        restored.load_state_dict({"state": kl.state_dict()["state"][:-3]})
    with pytest.raises(ValueError):
        kl.betas_for(np.array([2], dtype=np.int8))
    with pytest.raises(ValueError):
        epsdpo.KlController(-1.0, 0.1)


def test_epsilon_zero_never_moves_beta():
    kl = epsdpo.KlController(0.1, 0.0)
    betas = kl.record(np.arange(3, dtype=np.uint64), np.array([1, 1, -1], dtype=np.int8))
    assert betas.tolist() == [0.1, 0.1, 0.1]
    assert kl.apply_update(*kl.local_sums()) == 0.1
