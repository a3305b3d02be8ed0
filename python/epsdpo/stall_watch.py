"""Noticing a run that has stopped training while it still logs steps.

Under the paper's β rule the base β only ever divides by 1 + ε·s̄, and nothing stops it shrinking:
at ε = 0.9 it reaches the smallest float64 within ~1,500 steps, and at the default ε = 0.01 a tiny
model was seen at β = 3e-75 with an exactly-zero loss gradient by step 17,000, while the run went on
writing checkpoints. Each pair's gradient is β·σ(−β·gap) times the gradient of its gap, so once β is
tiny the weights stop moving (AdamW's weight decay and old momentum still move them a little).

`StallWatch` is told about every optimizer step and
- warns once when the base β falls below `BETA_WARN_FRACTION` of its starting value;
- raises `StalledTrainingError`, naming the step, when the gradient norm (before clipping) has been
  exactly zero for `MAX_ZERO_GRADIENT_STEPS` consecutive steps that had pairs to train on.

The paper's rule stays the default; `TrainConfig.beta_min` is the opt-in floor (docs/algorithm.md).
"""

from __future__ import annotations

import warnings

# A β a thousand times below its start scales every pair's gradient down a thousandfold: the run has
# effectively stopped learning from its preferences. At the default ε = 0.01 reaching it takes at least
# ln(1000)/ln(1.01) ≈ 694 steps on which every pair stepped +1, so it is never a passing dip.
BETA_WARN_FRACTION = 1e-3
# An exactly-zero gradient norm over a step with pairs does not happen by chance: even pairs with nothing to
# learn leave rounding noise (~1e-8). Ten in a row means β or the gradient has underflowed, and every later
# step would be the same; one or two (e.g. a frozen first step) are let through.
MAX_ZERO_GRADIENT_STEPS = 10


class StalledTrainingError(FloatingPointError):
    """β or the loss gradient underflowed, so the run no longer trains; raised before anything of the
    step that noticed it is saved."""


class StallWatch:
    """Per-run state of the two checks above (not checkpointed: a resumed run starts counting again,
    and warns again if its restored β is already below the fraction)."""

    def __init__(self, initial_beta: float) -> None:
        self.initial_beta = initial_beta
        self.zero_gradient_steps = 0
        self.first_zero_gradient_step = 0
        self.beta_warned = False

    def after_step(self, step: int, grad_norm: float, pairs: float, beta: float) -> None:
        """`grad_norm`: the step's gradient norm before clipping; `pairs`: how many pairs it trained on
        over all ranks (a step whose pairs were all dropped has a zero gradient legitimately); `beta`:
        the base β the next step will use."""
        if pairs > 0 and grad_norm == 0.0:
            if not self.zero_gradient_steps:
                self.first_zero_gradient_step = step
            self.zero_gradient_steps += 1
        elif pairs > 0:
            self.zero_gradient_steps = 0
        if self.zero_gradient_steps >= MAX_ZERO_GRADIENT_STEPS:
            first = self.first_zero_gradient_step
            raise StalledTrainingError(
                f"step {step}: the loss gradient has been exactly zero for {self.zero_gradient_steps} consecutive "
                f"steps with pairs (steps {first}-{step}; base β {beta:.3g}, started at {self.initial_beta:g}): the run no longer "
                "trains. Under the paper's rule β can shrink toward 0: lower epsilon, or set beta_min (a departure "
                "from the paper, docs/algorithm.md); nothing of this step was saved"
            )
        if not self.beta_warned and beta < BETA_WARN_FRACTION * self.initial_beta:
            self.beta_warned = True
            warnings.warn(
                f"step {step}: the base β is {beta:.3g}, below {BETA_WARN_FRACTION:g} of its start ({self.initial_beta:g}): "
                "every pair's gradient is scaled down as much, so training has effectively stopped. Lower epsilon, "
                "or set beta_min to floor β (a departure from the paper, docs/algorithm.md)",
                RuntimeWarning, stacklevel=3,
            )
