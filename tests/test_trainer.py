"""The training loop on tiny random Llamas: it learns, it is exact where it must be (DPO = ε 0,
accumulation, layouts, resume), and it fails cleanly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import epsdpo.methods.base as methods_base
from epsdpo.config import TrainConfig
from epsdpo.trainer import NonFiniteError, Trainer
from tiny import tiny_llama, toy_store

KEYS = ("loss", "kl/beta", "kl/mean_step", "rewards/margins", "grad_norm")


def config(tmp_path, **overrides) -> TrainConfig:
    base = dict(
        output_dir=str(tmp_path / "run"), beta=0.1, epsilon=0.1, learning_rate=3e-3,
        per_device_train_batch_size=8, max_steps=4, warmup_ratio=0.0, lr_scheduler_type="constant",
        max_length=32, max_prompt_length=16, progress=False, plots=False, seed=3, logging_steps=1,
    )
    base.update(overrides)
    return TrainConfig(**base)


def run(tmp_path, model_seed=0, store=None, **overrides):
    trainer = Trainer(tiny_llama(model_seed), config(tmp_path, **overrides), store or toy_store())
    trainer.train()
    return trainer


def series(trainer, key):
    return np.array([r[key] for r in trainer.state.log_history if key in r and "eval_loss" not in r])


def test_loss_falls_and_beta_follows_the_logged_steps(tmp_path):
    trainer = run(tmp_path, max_steps=24, epsilon=0.02)
    loss = series(trainer, "loss")
    assert loss[-4:].mean() < loss[:4].mean() - 0.05
    # β at step k+1 = β_k / (1 + ε·s̄_k), read off the log alone.
    beta, mean_step = series(trainer, "kl/beta"), series(trainer, "kl/mean_step")
    np.testing.assert_allclose(beta[1:], beta[:-1] / (1 + 0.02 * mean_step[:-1]), rtol=1e-12)
    np.testing.assert_allclose(trainer.kl.beta_history()[:-1], beta, rtol=1e-12)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [*range(1, 25), 24]  # then the run's summary
    ledger = np.load(tmp_path / "run" / "beta_ledger.npz")
    assert ledger["plus"].sum() + ledger["zero"].sum() + ledger["minus"].sum() == 24 * 8


def test_dpo_method_equals_epsilon_zero(tmp_path):
    dpo = run(tmp_path / "a", method="dpo", epsilon=0.3)
    eps0 = run(tmp_path / "b", method="epsilon_dpo", epsilon=0.0)
    for key in KEYS:
        np.testing.assert_array_equal(series(dpo, key), series(eps0, key))
    assert set(series(dpo, "kl/beta")) == {0.1}


def test_gradient_accumulation_1x8_equals_8x1(tmp_path):
    one = run(tmp_path / "a", per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=3)
    eight = run(tmp_path / "b", per_device_train_batch_size=1, gradient_accumulation_steps=8, max_steps=3)
    for key in ("loss", "kl/beta", "kl/mean_step", "rewards/margins"):
        np.testing.assert_allclose(series(one, key), series(eight, key), rtol=1e-5, atol=1e-6)
    for p, q in zip(one.model.parameters(), eight.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_uneven_accumulation_averages_over_every_pair_of_the_cycle(tmp_path):
    """5 pairs in micro-batches of 3 and 2: the step's gradient is the mean over the cycle's 5 pairs,
    computed here by hand, pair by pair, not the mean of the two micro-batch means (TRL's average)."""
    import epsdpo

    rng = np.random.default_rng(7)
    pairs = []
    store = epsdpo.PreferenceStore(vocab_size=64)
    for _ in range(5):
        prompt = rng.integers(2, 64, rng.integers(3, 9)).tolist()
        chosen, rejected = rng.integers(2, 64, rng.integers(2, 6)).tolist() + [1], rng.integers(2, 64, 3).tolist() + [1]
        pairs.append((prompt, chosen, rejected))
        store.add_pair(prompt, chosen, rejected)
    trainer = Trainer(tiny_llama(0), config(tmp_path, method="dpo", per_device_train_batch_size=3,
                                            gradient_accumulation_steps=2, max_steps=1, max_grad_norm=0.0,
                                            max_prompt_length=None),
                      store, ref_model=tiny_llama(1))
    seen = {}
    real_step = trainer._optimizer_step

    def capture(step, batches, nonfinite):
        seen["micro_batches"] = [b["pair_ids"].tolist() for b in batches]  # ids: the order added
        seen["grad"] = [p.grad.detach().clone() for p in trainer.params]
        return real_step(step, batches, nonfinite)

    trainer._optimizer_step = capture
    trainer.train()
    micro_batches = seen["micro_batches"]
    assert sorted(len(b) for b in micro_batches) == [2, 3]  # uneven, as the test needs

    policy, reference = tiny_llama(0), tiny_llama(1)

    def logp(model, prompt, completion):
        ids = torch.tensor([prompt + completion])
        token = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        return token[len(prompt) - 1:].sum()

    def pair_loss(i):
        prompt, chosen, rejected = pairs[i]
        with torch.no_grad():
            ref_margin = logp(reference, prompt, chosen) - logp(reference, prompt, rejected)
        margin = logp(policy, prompt, chosen) - logp(policy, prompt, rejected) - ref_margin
        return -torch.nn.functional.logsigmoid(0.1 * margin)

    params = list(policy.parameters())
    every_pair = torch.stack([pair_loss(i) for b in micro_batches for i in b]).mean()
    oracle = torch.autograd.grad(every_pair, params)
    batch_means = torch.stack([torch.stack([pair_loss(i) for i in b]).mean() for b in micro_batches]).mean()
    trl_style = torch.autograd.grad(batch_means, params)
    for got, want in zip(seen["grad"], oracle):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # the two averages differ by far more than the tolerance, so the check above can tell them apart
    error = max((g - w).abs().max().item() for g, w in zip(seen["grad"], oracle))
    assert max((a - b).abs().max().item() for a, b in zip(oracle, trl_style)) > 100 * max(error, 1e-7)


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_layouts_train_like_padded(tmp_path, layout):
    padded = run(tmp_path / "a", layout="padded", max_steps=3)
    other = run(tmp_path / "b", layout=layout, max_steps=3)
    for key in ("loss", "kl/beta", "rewards/margins"):
        np.testing.assert_allclose(series(other, key), series(padded, key), rtol=1e-4, atol=1e-5)
    assert series(other, "padding_fraction").mean() < series(padded, "padding_fraction").mean()


def test_resume_continues_exactly(tmp_path):
    full = run(tmp_path, max_steps=6, save_steps=2, save_total_limit=2)
    assert [c.name for c in full.checkpoints()] == ["checkpoint-4", "checkpoint-6"]  # older ones pruned
    # A fresh trainer from the same initial model resumes at step 4 and must retrace the run.
    resumed = Trainer(tiny_llama(0), config(tmp_path / "resumed", max_steps=6), toy_store())
    resumed.train(resume_from_checkpoint=tmp_path / "run" / "checkpoint-4")
    for key in KEYS:
        np.testing.assert_array_equal(series(resumed, key), series(full, key))
    np.testing.assert_array_equal(resumed.kl.beta_history(), full.kl.beta_history())
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_final_model_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = run(tmp_path, max_steps=1)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trainer.model.eval()(ids).logits)


def test_nan_loss_stops_cleanly(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = methods_base.epsilon_dpo_loss

    def poisoned(*args, **kwargs):
        losses, rc, rr = real(*args, **kwargs)
        calls["n"] += 1
        return (losses * float("nan") if calls["n"] == 3 else losses), rc, rr

    monkeypatch.setattr(methods_base, "epsilon_dpo_loss", poisoned)
    trainer = Trainer(tiny_llama(), config(tmp_path, max_steps=5, save_steps=1), toy_store())
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss for pair ids \[\d+"):
        trainer.train()
    names = sorted(p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.parametrize(
    "bad",
    [dict(method="ipo"), dict(layout="ragged"), dict(beta=0.0), dict(epsilon=1.0), dict(cdpo_smoothing=0.5),
     dict(label_smoothing=0.1), dict(loss_type="ipo"),
     dict(per_device_train_batch_size=0), dict(max_length=8, max_prompt_length=8), dict(report_to="comet_ml"),
     dict(num_train_epochs=0, max_steps=-1)],
)
def test_invalid_config_values_fail_at_construction(bad):
    with pytest.raises(ValueError, match="must be"):
        TrainConfig(**bad)


def test_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.05\nlayout: packed\nmax_steps: 7\n")
    cfg = TrainConfig.from_yaml(path, {"learning_rate": 1e-5})
    assert (cfg.beta, cfg.layout, cfg.max_steps, cfg.learning_rate) == (0.05, "packed", 7, 1e-5)
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"betta": 0.1})


def test_evaluate_never_moves_beta(tmp_path):
    trainer = Trainer(tiny_llama(), config(tmp_path, max_steps=2, eval_steps=1), toy_store(), eval_dataset=toy_store(16, seed=5))
    trainer.train()
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    before = trainer.kl.beta_history().copy()
    metrics = trainer.evaluate()
    np.testing.assert_array_equal(trainer.kl.beta_history(), before)
    assert 0.0 <= metrics["eval_rewards/accuracies"] <= 1.0


def test_epsilon_check_and_step_can_differ(tmp_path):
    """ε_c drives the perturbation (the steps), ε_s the β update: with ε_s = 0 β stays put while the
    steps are still taken; with ε_c equal to ε the run is the plain ε-DPO run."""
    fixed = run(tmp_path / "a", epsilon=0.0, epsilon_check=0.1, max_steps=3)
    plain = run(tmp_path / "b", epsilon=0.1, max_steps=3)
    same = run(tmp_path / "c", epsilon=0.1, epsilon_check=0.1, max_steps=3)
    assert set(series(fixed, "kl/beta")) == {0.1}
    assert np.abs(series(fixed, "kl/mean_step")).sum() > 0
    np.testing.assert_array_equal(series(same, "loss"), series(plain, "loss"))


def test_tr_dpo_moves_the_reference_every_tau_steps(tmp_path):
    trainer = run(tmp_path, method="tr_dpo", ref_model_sync_steps=2, ref_model_mixup_alpha=0.5, max_steps=3, save_steps=2)
    initial = tiny_llama(0)
    moved = [not torch.equal(r, p0) for r, p0 in zip(trainer.ref_model.parameters(), initial.parameters())]
    assert any(moved)
    resumed = Trainer(tiny_llama(0), config(tmp_path / "r", method="tr_dpo", ref_model_sync_steps=2, ref_model_mixup_alpha=0.5,
                                             max_steps=3), toy_store())
    resumed.train(resume_from_checkpoint=tmp_path / "run" / "checkpoint-2")
    np.testing.assert_array_equal(series(resumed, "loss"), series(trainer, "loss"))


def test_beta_dpo_adapts_the_batch_beta(tmp_path):
    from epsdpo.baselines import BetaDPO

    trainer = run(tmp_path, method="beta_dpo", max_steps=4)
    pair_betas = series(trainer, "kl/pair_beta_mean")
    assert pair_betas[0] == pytest.approx(0.1) and len(set(np.round(pair_betas, 12))) > 1
    rule = BetaDPO(beta0=0.1, alpha=0.6, momentum=0.9)
    assert rule.batch_beta(2.0) == pytest.approx(0.1)  # first batch seeds the running gap
    assert rule.batch_beta(3.0) == pytest.approx(0.1 * (1 + 0.6 * (3.0 - 2.0)))
    assert rule.running_gap == pytest.approx(0.9 * 2.0 + 0.1 * 3.0)
    rule.filter_fraction = 0.5
    keep = rule.keep(torch.tensor([0.0, 2.1, 5.0, 2.0]))
    assert keep.tolist() == [False, True, False, True]


def test_sync_ref_model_is_tr_dpo_in_trls_spelling(tmp_path):
    """TRL's sync_ref_model on DPO trains exactly as method='tr_dpo'."""
    knobs = dict(ref_model_sync_steps=2, ref_model_mixup_alpha=0.5, max_steps=3)
    tr_dpo = run(tmp_path / "a", method="tr_dpo", **knobs)
    synced = run(tmp_path / "b", method="dpo", sync_ref_model=True, **knobs)
    np.testing.assert_array_equal(series(synced, "loss"), series(tr_dpo, "loss"))
    assert abs(series(synced, "loss")[2] - series(run(tmp_path / "c", method="dpo", max_steps=3), "loss")[2]) > 1e-6


def collate_threads():
    import threading

    from epsdpo.feed import COLLATE_THREAD

    return [t.name for t in threading.enumerate() if t.name.startswith(COLLATE_THREAD)]


def test_the_collating_thread_ends_with_the_run_whether_it_finishes_or_fails(tmp_path, monkeypatch):
    """CycleFeed's worker thread is shut down when training returns and when it raises mid-cycle
    (while the next cycle is being collated), so a process that trains many times keeps no threads."""
    assert collate_threads() == []
    trainer = run(tmp_path / "done", max_steps=2, per_device_train_batch_size=4)
    assert trainer.state.global_step == 2 and collate_threads() == []

    trainer = Trainer(tiny_llama(0), config(tmp_path / "fails", max_steps=4, per_device_train_batch_size=4), toy_store())
    steps = []

    def step_that_fails(batches):
        steps.append(len(batches))
        raise RuntimeError("injected: the training step failed")

    monkeypatch.setattr(trainer, "_train_step", step_that_fails)
    with pytest.raises(RuntimeError, match="injected"):
        trainer.train()
    assert steps == [1]  # it failed with the second cycle handed to the collating thread
    assert collate_threads() == []
