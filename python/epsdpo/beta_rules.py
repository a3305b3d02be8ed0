"""How β is chosen for each pair: one interface, one small class per rule.

A rule answers two questions of the training loop: which β_i does each pair of a micro-batch train
with (and, for β-DPO's filter, which pairs train at all), and what happens to β once the optimizer
has stepped. The loop reads the same for every method; each method of `epsdpo.methods` holds its
rule (β-DPO's, `BatchAdaptiveBeta`, lives in its file) with the method's other post-step work.

- `KlControlledBeta`: ε-DPO's per-pair β_i = β / (1 + ε·s_i) from the Rust `KlController`, which
  books every step s_i and moves β once per optimizer step over all ranks (docs/algorithm.md, 'The β
  update'). DPO, and TR-DPO, are the same rule at ε = 0: every s_i is 0 and β never moves.
- β-DPO's one β per batch from the batch's mean implicit-reward gap: `epsdpo.methods.beta_dpo`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from epsdpo._core import KlController
from epsdpo.distributed import DistInfo, all_reduce_sum


class PairLogps(NamedTuple):
    """Per-pair sequence log-probs of one micro-batch ([pairs] each) and the pairs' ε-DPO steps."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    reference_chosen: Tensor
    reference_rejected: Tensor
    steps: Tensor
    """s_i ∈ {−1, 0, +1} (long); all 0 when no perturbation is checked."""

    def implicit_gaps(self, beta: float) -> Tensor:
        """β·((π_c − ref_c) − (π_r − ref_r)) per pair, detached, in float64."""
        gaps = (self.policy_chosen - self.reference_chosen) - (self.policy_rejected - self.reference_rejected)
        return (beta * gaps).detach().to(torch.float64)


class PairBetas(NamedTuple):
    betas: Tensor
    """β_i per pair, on the loss's device."""
    keep: Tensor | None
    """The pairs that train (β-DPO's data filter), or None when all do."""
    kept_fraction: float
    """The fraction of pairs `keep` keeps (1.0 without a filter); the loss is a mean over these."""


class KlControlledBeta:
    """β_i from the KlController; training books the steps, evaluation only reads β."""

    def __init__(self, kl: KlController, dist: DistInfo, device: torch.device) -> None:
        self.kl, self.dist, self.device = kl, dist, device

    @property
    def beta(self) -> float:
        """The base β of the current step (what `kl/beta` logs)."""
        return self.kl.beta

    def pair_betas(self, pair_ids: np.ndarray, logps: PairLogps, *, train: bool) -> PairBetas:
        codes = logps.steps.to(torch.int8).cpu().numpy()
        betas = self.kl.record(pair_ids, codes) if train else self.kl.betas_for(codes)
        return PairBetas(torch.from_numpy(betas).to(self.device), None, 1.0)

    def empty_micro_batch(self) -> None:
        """A micro-batch with no pair on this rank: join whatever collective the others make for
        theirs, so that ranks stay in step (nothing here)."""

    def skip_step(self) -> None:
        """The optimizer skipped this step (fp16 overflow): β stays, and the cycle's steps are dropped."""
        self.kl.apply_update(0, 0)

    def end_step(self) -> None:
        """β ← β / (1 + ε·s̄) with s̄ the mean step over every pair of the cycle on every rank."""
        local_sum, local_count = self.kl.local_sums()
        totals = all_reduce_sum(torch.tensor([float(local_sum), float(local_count)], dtype=torch.float64), self.dist)
        self.kl.apply_update(int(totals[0].item()), int(totals[1].item()))

    def state_dict(self) -> dict[str, Any]:
        """What the rule holds beyond the KlController (saved with it in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
