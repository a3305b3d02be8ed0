"""precompute_ref_log_probs: reference log-probs computed once train exactly as the reference run
every step, resume, and are refused where the reference itself is needed during training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from tiny import tiny_llama, toy_store

KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "kl/pair_beta_mean", "grad_norm")
EVAL_KEYS = ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies")


def run(tmp_path, resume=None, **overrides) -> Trainer:
    config = TrainConfig(**{
        **dict(output_dir=str(tmp_path), beta=0.1, learning_rate=3e-3, per_device_train_batch_size=8,
               per_device_eval_batch_size=5, max_steps=4, lr_scheduler_type="constant", max_length=32,
               max_prompt_length=16, eval_steps=2, progress=False, plots=False, seed=3, logging_steps=1),
        **overrides,
    })
    trainer = Trainer(tiny_llama(0), config, toy_store(), eval_dataset=toy_store(12, seed=5))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def records(trainer, keys):
    return np.array([[r[k] for k in keys] for r in trainer.state.log_history if keys[0] in r])


@pytest.mark.parametrize("method", ["dpo", "beta_dpo"])
def test_precomputed_reference_trains_as_the_live_one(tmp_path, method):
    live = run(tmp_path / "live", method=method)
    pre = run(tmp_path / "pre", method=method, precompute_ref_log_probs=True, precompute_ref_batch_size=3)
    assert pre.ref_model is None and pre.reference_unit is None  # released after the precomputation
    # Batch shapes differ between the two passes (padding), so float32 sums may differ in the last bits.
    np.testing.assert_allclose(records(pre, KEYS), records(live, KEYS), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(records(pre, EVAL_KEYS), records(live, EVAL_KEYS), rtol=1e-5, atol=1e-6)
    for p, q in zip(pre.model.parameters(), live.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_precomputed_table_holds_the_reference_log_probs(tmp_path):
    trainer = run(tmp_path, method="dpo", precompute_ref_log_probs=True, max_steps=1)
    batch = trainer.collator(trainer.train_store, np.arange(6, dtype=np.uint32))
    reference = tiny_llama(0).eval()
    live = Trainer(reference, TrainConfig(output_dir=str(tmp_path / "x"), method="dpo", max_length=32,
                                          max_prompt_length=16, progress=False), toy_store())
    with torch.no_grad():
        want = live._score(batch)
    table = trainer.reference_logps["train"]
    torch.testing.assert_close(table[:6, 0], want.reference_chosen, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(table[:6, 1], want.reference_rejected, rtol=1e-6, atol=1e-6)


def test_resume_recomputes_and_continues_exactly(tmp_path):
    knobs = dict(method="dpo", precompute_ref_log_probs=True, max_steps=4, save_steps=2)
    full = run(tmp_path / "full", **knobs)
    resumed = run(tmp_path / "resumed", resume=tmp_path / "full" / "checkpoint-2", **knobs)
    np.testing.assert_array_equal(records(resumed, KEYS), records(full, KEYS))
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("knobs", [dict(method="epsilon_dpo"), dict(method="tr_dpo"),
                                   dict(method="dpo", sync_ref_model=True)])
def test_refused_where_training_needs_the_reference(knobs):
    with pytest.raises(ValueError, match=r"^precompute_ref_log_probs=True is invalid: must be False") as info:
        TrainConfig(precompute_ref_log_probs=True, **knobs)
    assert "\n" not in str(info.value)


def test_epsilon_dpo_without_perturbation_may_precompute():
    assert TrainConfig(method="epsilon_dpo", epsilon=0.0, precompute_ref_log_probs=True).precompute_ref_log_probs
