"""Runs that would log steps while learning nothing: pairs whose chosen and rejected are the same
tokens after truncation (dropped, counted, an error when none is left), and a β or gradient that has
underflowed (a warning when β falls below a thousandth of its start, an error after ten steps of an
exactly-zero gradient, absurd β refused, and the opt-in beta_min floor)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import epsdpo
from epsdpo.config import MIN_BETA, TrainConfig
from epsdpo.data import compute_stats
from epsdpo.stall_watch import BETA_WARN_FRACTION, MAX_ZERO_GRADIENT_STEPS
from epsdpo.trainer import StalledTrainingError, Trainer
from tiny import VOCAB, tiny_llama, toy_store


def config(out, **overrides) -> TrainConfig:
    base = dict(output_dir=str(out), beta=0.1, epsilon=0.1, learning_rate=3e-3, per_device_train_batch_size=4,
                max_steps=3, warmup_ratio=0.0, lr_scheduler_type="constant", max_length=32, max_prompt_length=16,
                progress=False, plots=False, seed=3, logging_steps=1, report_to="none")
    base.update(overrides)
    return TrainConfig(**base)


def store_of(pairs) -> epsdpo.PreferenceStore:
    store = epsdpo.PreferenceStore(vocab_size=VOCAB)
    for prompt, chosen, rejected in pairs:
        store.add_pair(prompt, chosen, rejected)
    return store


# Identical only once completions are cut to 2 tokens; identical as stored; identical once max_length
# leaves the completion 2 tokens after an 8-token prompt (max_length 10).
SAME_AFTER_CUT = ([5, 6, 7], [9, 10, 11, 12], [9, 10, 13])
SAME_AS_STORED = ([5, 6], [20, 21, 1], [20, 21, 1])


# ------------------------------------------------------------------------ pairs with nothing to learn
@pytest.mark.parametrize("pairs, limits", [
    ([SAME_AS_STORED] * 4, {}),
    ([SAME_AFTER_CUT] * 3 + [SAME_AS_STORED], {"max_completion_length": 2}),
    ([([2, 3, 4, 5, 6, 7, 8, 9], [30, 31, 32], [30, 31, 33])] * 4, {"max_length": 10, "max_prompt_length": None}),
    ([SAME_AS_STORED] * 2 + [([2] * 40, [3], [4])] * 2, {"skip_invalid": True, "max_prompt_length": None}),  # the rest emptied
], ids=["identical as stored", "identical after max_completion_length", "identical after max_length",
        "identical or emptied"])
def test_a_dataset_with_no_pair_left_to_learn_from_is_an_error(tmp_path, pairs, limits):
    with pytest.raises(ValueError, match=r"no pair can be trained on: \d+ of the train data's 4 pairs have the same "
                                         r"chosen and rejected tokens after truncation .*\(first: pair 0\)"):
        Trainer(tiny_llama(0), config(tmp_path / "run", **limits), store_of(pairs))


def test_an_eval_dataset_with_no_pair_left_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no pair can be evaluated on: 2 of the eval data's 2 pairs"):
        Trainer(tiny_llama(0), config(tmp_path / "run"), toy_store(16), eval_dataset=store_of([SAME_AS_STORED] * 2))


def test_identical_pairs_are_counted_warned_about_and_never_fed(tmp_path):
    train = toy_store(16)
    start = len(train)
    for pair in (SAME_AFTER_CUT, SAME_AS_STORED, SAME_AFTER_CUT):
        train.add_pair(*pair)
    identical = {start, start + 1, start + 2}
    evaluation = store_of([SAME_AS_STORED, ([5, 6], [7, 1], [8, 1])])
    with pytest.warns(UserWarning) as caught:
        trainer = Trainer(tiny_llama(0), config(tmp_path / "run", max_completion_length=2, max_steps=6), train,
                          eval_dataset=evaluation)
    said = [str(w.message) for w in caught if "same chosen and rejected" in str(w.message)]
    assert said == [
        f"train data: 3 of {start + 3} pairs have the same chosen and rejected tokens after truncation to max_length=32, "
        f"max_prompt_length=16, max_completion_length=2 (first: pair {start}); they are dropped, having nothing to learn",
        "eval data: 1 of 2 pairs have the same chosen and rejected tokens after truncation to max_length=32, "
        "max_prompt_length=16, max_completion_length=2 (first: pair 0); they are dropped, having nothing to learn",
    ]
    fed: dict[bool, list[int]] = {True: [], False: []}
    real = trainer._micro_batch

    def recording(batch, sums, *, train):
        fed[train].extend(batch["pair_indices"].tolist())
        return real(batch, sums, train=train)

    trainer._micro_batch = recording
    trainer.train()  # 6 steps of 4 pairs: every one of the 19 pairs offered at least once
    trainer.evaluate()
    assert set(fed[True]) == set(range(start)), "an identical pair was trained on, or another pair was not"
    assert set(fed[False]) == {1}, "the identical eval pair was scored"


def test_the_data_report_counts_identical_pairs_after_truncation():
    store = store_of([SAME_AFTER_CUT, SAME_AS_STORED, ([5], [7, 8], [9])])
    assert compute_stats(store).identical_after_truncation == 1
    report = compute_stats(store, truncation=epsdpo.Truncation(max_completion_length=2))
    assert report.identical_after_truncation == 2
    assert "chosen identical to rejected (dropped): 2" in str(report)
    lengths = epsdpo.Collator(truncation=epsdpo.Truncation(max_completion_length=2)).truncated_lengths(store)
    assert lengths["identical"].tolist() == [0, 1]


# ---------------------------------------------------------------------- β and gradients that underflow
@pytest.mark.parametrize("field, value", [("beta", 1e-300), ("beta", 5e-324), ("beta", MIN_BETA / 2),
                                          ("beta_min", 1e-300), ("beta_min", 0.0), ("beta_min", -0.1),
                                          ("beta_min", 0.2), ("beta_min", math.inf)])
def test_a_beta_that_trains_nothing_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid: must be"):
        TrainConfig(**{field: value})


def test_beta_min_is_refused_where_it_would_not_floor_the_beta_used():
    with pytest.raises(ValueError, match="^beta_min=0.01 is invalid: must be None with method='beta_dpo'"):
        TrainConfig(method="beta_dpo", beta_min=0.01)


def test_the_smallest_accepted_betas():
    assert TrainConfig(beta=MIN_BETA, beta_min=MIN_BETA).beta_min == MIN_BETA
    assert TrainConfig(beta=0.1, beta_min=0.1).beta_min == 0.1
    assert TrainConfig().beta_min is None  # the paper's rule by default


def forcing_every_step_plus_one(trainer):
    """Every pair steps +1 (what a policy far outside the trust region would do), so β falls by 1 + ε
    every step: a fast, deterministic stand-in for thousands of steps."""
    rule = trainer.method.beta_rule
    real = rule.pair_betas

    def plus_one(pair_ids, logps, *, train):
        return real(pair_ids, logps._replace(steps=torch.ones_like(logps.steps)), train=train)

    rule.pair_betas = plus_one


def test_a_beta_shrunk_below_a_thousandth_of_its_start_is_warned_about_once(tmp_path):
    trainer = Trainer(tiny_llama(0), config(tmp_path / "run", epsilon=0.9, max_steps=14), toy_store(32))
    forcing_every_step_plus_one(trainer)
    with pytest.warns(RuntimeWarning) as caught:
        trainer.train()
    said = [str(w.message) for w in caught if "base β" in str(w.message)]
    # 0.1 / 1.9^11 is the first β below 1e-4 (0.1 / 1.9^10 = 1.6e-4)
    assert len(said) == 1 and said[0].startswith(f"step 11: the base β is {0.1 / 1.9**11:.3g}, below {BETA_WARN_FRACTION:g} "
                                                 "of its start (0.1)"), said
    assert "beta_min" in said[0]


def test_beta_min_floors_the_beta_pairs_train_with_and_the_ledger(tmp_path):
    floor = 2e-3
    trainer = Trainer(tiny_llama(0), config(tmp_path / "run", epsilon=0.9, max_steps=14, beta_min=floor),
                      toy_store(32))
    forcing_every_step_plus_one(trainer)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the floor is above the warning's fraction
        history = trainer.train().log_history
    betas = trainer.kl.beta_history()
    assert betas[0] == 0.1 and betas[-1] == floor and min(betas) == floor
    assert betas[7] == floor and betas[6] > floor, betas  # 0.1 / 1.9^6 = 2.1e-3, 0.1 / 1.9^7 = 1.1e-3
    logged = [r["kl/beta"] for r in history if "loss" in r]
    assert logged == betas[:-1].tolist()
    # the pairs trained at step 14 were booked at the floored β / (1 + ε)
    ledger = trainer.kl.ledger()
    assert np.isclose(ledger["last_beta"].min(), floor / 1.9)
    saved = np.load(tmp_path / "run" / "beta_ledger.npz")
    assert saved["beta_history"][-1] == floor


def test_an_exactly_zero_gradient_stops_the_run_before_saving(tmp_path):
    out = tmp_path / "run"
    steps = MAX_ZERO_GRADIENT_STEPS + 5
    trainer = Trainer(tiny_llama(0), config(out, max_steps=steps, save_steps=MAX_ZERO_GRADIENT_STEPS + 1), toy_store(32))
    rule = trainer.method.beta_rule
    real = rule.pair_betas

    def underflowed(pair_ids, logps, *, train):  # β_i that underflowed to 0, as 5e-324 does in float32
        betas = real(pair_ids, logps, train=train)
        return betas._replace(betas=betas.betas * 0.0)

    rule.pair_betas = underflowed
    with pytest.raises(StalledTrainingError, match=rf"^step {MAX_ZERO_GRADIENT_STEPS}: the loss gradient has been "
                                                   rf"exactly zero for {MAX_ZERO_GRADIENT_STEPS} consecutive steps with pairs "
                                                   rf"\(steps 1-{MAX_ZERO_GRADIENT_STEPS}"):
        trainer.train()
    assert trainer.checkpoints() == [] and not (out / "final").exists()


def test_steps_with_every_pair_dropped_neither_count_nor_reset_the_zero_gradient_streak():
    from epsdpo.stall_watch import StallWatch

    watch = StallWatch(0.1)
    step = 0
    for grad_norm, pairs in [(0.0, 8.0)] * (MAX_ZERO_GRADIENT_STEPS - 1) + [(0.0, 0.0)] * 5 + [(1e-3, 8.0)] \
            + [(0.0, 8.0)] * (MAX_ZERO_GRADIENT_STEPS - 1) + [(0.0, 0.0)] * 5:
        step += 1
        watch.after_step(step, grad_norm, pairs, 0.1)
    with pytest.raises(StalledTrainingError, match=rf"step {step + 1}: .* \(steps {step + 1 - 5 - MAX_ZERO_GRADIENT_STEPS + 1}-{step + 1};"):
        watch.after_step(step + 1, 0.0, 8.0, 0.1)


def test_beta_min_is_the_resuming_runs_setting_and_old_states_load():
    from epsdpo._core import KlController

    saved = KlController(0.1, 0.5)  # a state written without a floor (the format is unchanged)
    saved.record(np.array([1, 2], dtype=np.uint64), np.array([1, 1], dtype=np.int8))
    saved.apply_update(2, 2)
    resumed = KlController(0.1, 0.5, beta_min=0.05)
    resumed.load_state_dict(saved.state_dict())
    assert (resumed.beta, resumed.beta_min) == (saved.beta, 0.05)
    resumed.apply_update(2, 2)
    assert resumed.beta == 0.05 and resumed.beta_history().tolist() == [0.1, 0.1 / 1.5, 0.05]
    too_high = KlController(0.1, 0.5, beta_min=0.08)  # above the restored β of 0.1 / 1.5
    with pytest.raises(epsdpo.ConfigError, match="beta_min = 0.08 is above beta = 0.0666"):
        too_high.load_state_dict(saved.state_dict())
