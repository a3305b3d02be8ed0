"""Mixed precision trains where pure half precision silently would not: bf16 compute over fp32 master
weights moves the weights like fp32, half-precision trained weights are refused, fp16 is loss-scaled
(and a run whose fp16 gradients are never finite stops instead of skipping every step), and the fused
kernel keeps fp32 statistics under autocast."""

from __future__ import annotations

import math
import re

import pytest
import torch

from epsdpo import precision
from epsdpo.config import TrainConfig
from epsdpo.ops import perturbed_logps
from epsdpo.trainer import NonFiniteError, Trainer
from tiny import tiny_llama, toy_store

LR = 5e-7  # the paper's learning rate, where a bf16 weight loses nearly every AdamW update


def config(tmp_path, name, **overrides) -> TrainConfig:
    base = dict(
        output_dir=str(tmp_path / name), beta=0.1, epsilon=0.01, learning_rate=LR, per_device_train_batch_size=8,
        max_steps=8, warmup_ratio=0.0, lr_scheduler_type="constant", max_length=32, max_prompt_length=16,
        progress=False, plots=False, seed=3, report_to="none", logging_steps=1,
    )
    base.update(overrides)
    return TrainConfig(**base)


def update(tmp_path, name, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial weights, their change after training) as flat float64 vectors."""
    model = tiny_llama(0)
    initial = torch.cat([p.detach().double().flatten().clone() for p in model.parameters()])
    trainer = Trainer(model, config(tmp_path, name, **overrides), toy_store())
    trainer.train()
    final = torch.cat([p.detach().double().flatten() for p in trainer.model.parameters()])
    return initial, final - initial


def test_bf16_mixed_precision_moves_the_weights_like_fp32(tmp_path):
    initial, fp32 = update(tmp_path, "fp32")
    _, bf16 = update(tmp_path, "bf16", bf16=True)
    assert (fp32 != 0).double().mean() > 0.95
    assert (bf16 != 0).double().mean() > 0.95, "bf16 mixed precision left weights unmoved"
    cosine = torch.nn.functional.cosine_similarity(bf16, fp32, dim=0)
    assert cosine > 0.9, f"bf16 update points elsewhere than fp32's (cosine {cosine:.3f})"
    # The test can fail: the same updates applied to bf16-stored weights mostly round away, which is
    # what pure bf16 training would do.
    stored = initial.to(torch.bfloat16)
    kept = ((stored + fp32.to(torch.bfloat16)) != stored).double().mean()
    assert kept < 0.2, f"lr {LR} is too large to tell: {kept:.2f} of bf16 weights keep the update"


def test_fp16_is_loss_scaled_and_trains(tmp_path):
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.Linear(2, 2)(torch.ones(1, 2))
    except RuntimeError as error:  # pragma: no cover - depends on the torch build
        pytest.skip(f"no fp16 autocast on this CPU build: {error}")
    _, fp32 = update(tmp_path, "fp32")
    _, fp16 = update(tmp_path, "fp16", fp16=True)
    assert torch.isfinite(fp16).all()
    assert torch.nn.functional.cosine_similarity(fp16, fp32, dim=0) > 0.9
    history = [r for r in Trainer(tiny_llama(0), config(tmp_path, "log", fp16=True, max_steps=2),
                                  toy_store()).train().log_history if "loss" in r]
    assert all(r["loss_scale"] > 1 for r in history), "fp16 ran without a loss scale"


@pytest.mark.parametrize("overrides, model_dtype", [
    (dict(dtype="bfloat16"), torch.float32),
    (dict(dtype="float16", fp16=True), torch.float32),
    ({}, torch.bfloat16),
    (dict(bf16=True), torch.bfloat16),
])
def test_half_precision_trained_weights_are_refused(tmp_path, overrides, model_dtype):
    with pytest.raises(ValueError, match="trainable weights are .*dtype='float32'"):
        Trainer(tiny_llama(0).to(model_dtype), config(tmp_path, "x", **overrides), toy_store())


def test_a_bf16_model_trains_when_dtype_float32_asks_for_the_cast(tmp_path):
    trainer = Trainer(tiny_llama(0).to(torch.bfloat16), config(tmp_path, "x", dtype="float32", bf16=True,
                                                               max_steps=1), toy_store())
    assert next(trainer.model.parameters()).dtype == torch.float32
    trainer.train()


def test_a_frozen_bf16_reference_is_kept_as_given(tmp_path):
    reference = tiny_llama(0).to(torch.bfloat16)
    trainer = Trainer(tiny_llama(0), config(tmp_path, "x", bf16=True, max_steps=2), toy_store(), ref_model=reference)
    assert next(trainer.ref_model.parameters()).dtype == torch.bfloat16
    trainer.train()


def test_bf16_and_fp16_together_name_the_field():
    with pytest.raises(ValueError, match="fp16=True is invalid"):
        TrainConfig(bf16=True, fp16=True)


def test_kernel_under_autocast_computes_the_head_in_bf16_with_fp32_statistics():
    torch.manual_seed(0)
    hidden = torch.randn(12, 16, requires_grad=True)
    weight = (0.3 * torch.randn(40, 16)).requires_grad_()
    ref_hidden, ref_weight = hidden.detach() + 0.05, weight.detach() * 0.9
    labels = torch.randint(0, 40, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = perturbed_logps(hidden, weight, labels, ref_hidden, ref_weight, 0.1)
    mixed.policy.sum().backward()
    rounded = [t.to(torch.bfloat16).float() for t in (hidden.detach(), weight.detach(), ref_hidden, ref_weight)]
    want = perturbed_logps(*rounded[:2], labels, *rounded[2:], 0.1)
    for got, expected in zip(mixed, want):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_a_step_the_fp16_scaler_skips_moves_neither_beta_nor_the_reference(tmp_path, monkeypatch):
    trainer = Trainer(tiny_llama(0), config(tmp_path, "skip", fp16=True, max_steps=3, learning_rate=1e-3,
                                            epsilon=0.5, method="epsilon_dpo", sync_ref_model=True,
                                            ref_model_sync_steps=1), toy_store())
    real_step, calls = trainer.precision.step, {"n": 0}

    def skip_the_second(optimizer):
        calls["n"] += 1
        if calls["n"] != 2:
            return real_step(optimizer)
        trainer.precision.scaler.update()  # what an overflow does: no step, the scaler moves on
        return False

    monkeypatch.setattr(trainer.precision, "step", skip_the_second)
    moved = []
    real_hook = trainer.method.after_step[0]
    trainer.method.after_step[0] = lambda step: (moved.append(step), real_hook(step))
    history = trainer.train().log_history
    beta = trainer.kl.beta_history()
    steps = [r for r in history if "loss" in r]
    assert steps[1]["kl/mean_step"] != 0, "the skipped step had pairs that would have moved β"
    assert beta[2] == beta[1] and beta[3] != beta[2]
    assert moved == [1, 3]
    assert [r["skipped_step"] for r in history if "loss" in r] == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("init_scale, stops_at", [(2.0**16, 5), (2.0**-12, 3)],
                         ids=["skipped steps in a row", "scale below the floor"])
def test_fp16_that_never_steps_stops_naming_the_step_before_anything_is_saved(tmp_path, monkeypatch, init_scale,
                                                                              stops_at):
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.Linear(2, 2)(torch.ones(1, 2))
    except RuntimeError as error:  # pragma: no cover - depends on the torch build
        pytest.skip(f"no fp16 autocast on this CPU build: {error}")
    # fp16 forwards are slow on CPU (~0.3 s each here): the run of skips it takes is shortened to 5 (the
    # default, MAX_CONSECUTIVE_SKIPPED_STEPS, is 20); the scale floor is the real one.
    limit = 5
    monkeypatch.setattr(precision, "MAX_CONSECUTIVE_SKIPPED_STEPS", limit)
    out = tmp_path / "never"
    trainer = Trainer(tiny_llama(0), config(tmp_path, "never", fp16=True, max_steps=limit + 3, save_steps=limit + 1,
                                            per_device_train_batch_size=2, max_length=16, max_prompt_length=8),
                      toy_store(8))
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    # A gradient that is non-finite whatever the scale, as an inf from the forward pass would be
    trainer.params[-1].register_hook(lambda grad: torch.full_like(grad, math.inf))
    scale = init_scale / 2**stops_at
    with pytest.raises(NonFiniteError, match=rf"^step {stops_at}: fp16 gradients were non-finite at {stops_at} "
                                             rf"consecutive steps, so each was skipped, and the loss scale fell to "
                                             rf"{re.escape(f'{scale:.3g}')} \(limits: {limit} skipped steps in "
                                             rf"a row, scale 2\^-14\)"):
        trainer.train()
    assert trainer.checkpoints() == [] and not (out / "final").exists()

