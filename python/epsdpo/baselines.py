"""The adaptive-KL baselines ε-DPO is compared with, each as small as its rule.

- TR-DPO (Gorbatovski et al., 2024), soft update: every τ optimizer steps the reference moves toward
  the policy, θ_ref ← α·θ + (1 − α)·θ_ref (the paper's HH runs: τ = 128, α = 0.6).
- β-DPO (Wu et al., 2024): one β per batch from how the batch's mean implicit reward gap M compares
  with a running mean M₀ of it: β = β₀·(1 + a·(M − M₀)), a = 0.6, M₀ ← m·M₀ + (1 − m)·M; and,
  optionally, its data filter: keep the fraction ρ of the batch whose gaps lie closest to M₀
  (the pairs a Gaussian around M₀ weights most).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@torch.no_grad()
def soft_update_reference(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO's soft update θ_ref ← α·θ + (1 − α)·θ_ref, parameter by parameter."""
    for ref_param, param in zip(reference.parameters(), policy.parameters(), strict=True):
        ref_param.lerp_(param.detach().to(ref_param.dtype), alpha)


@dataclass
class BetaDPO:
    """β-DPO's batch-level β. `gaps` are per-pair implicit reward gaps β₀·u_i, detached."""

    beta0: float
    alpha: float = 0.6
    momentum: float = 0.9
    filter_fraction: float | None = None
    running_gap: float | None = None  # M₀; seeded by the first batch's mean

    def batch_beta(self, mean_gap: float) -> float:
        """β for a batch whose (global) mean gap is `mean_gap`; then M₀ moves toward it."""
        if self.running_gap is None:
            self.running_gap = mean_gap
        beta = self.beta0 * (1.0 + self.alpha * (mean_gap - self.running_gap))
        self.running_gap = self.momentum * self.running_gap + (1.0 - self.momentum) * mean_gap
        # A large negative deviation would flip the sign of the objective; β-DPO clamps to a floor.
        return max(beta, 1e-3 * self.beta0)

    def keep(self, gaps: Tensor) -> Tensor:
        """Boolean mask of the pairs the data filter keeps (all of them when filtering is off)."""
        if self.filter_fraction is None or self.running_gap is None:
            return torch.ones_like(gaps, dtype=torch.bool)
        k = max(1, round(self.filter_fraction * gaps.numel()))
        closest = (gaps - self.running_gap).abs().argsort()[:k]
        mask = torch.zeros_like(gaps, dtype=torch.bool)
        mask[closest] = True
        return mask
