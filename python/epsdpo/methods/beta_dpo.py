"""β-DPO (Wu et al., 2024): one β per batch, β = β₀·(1 + a·(M − M₀)) from the batch's mean implicit
reward gap M over all ranks and its running mean M₀, and optionally a data filter keeping the pairs
whose gaps lie closest to M₀. The rule's arithmetic is `epsdpo.baselines.BetaDPO`; here it becomes
the method's β rule. Evaluation scores at β₀ and leaves M₀ alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from epsdpo._core import KlController
from epsdpo.baselines import BetaDPO as BetaDPORule
from epsdpo.beta_rules import KlControlledBeta, PairBetas, PairLogps
from epsdpo.distributed import DistInfo, all_reduce_sum
from epsdpo.methods.base import Check, SigmoidMethod

if TYPE_CHECKING:
    from epsdpo.methods.settings import MethodSettings


class BatchAdaptiveBeta(KlControlledBeta):
    """Every pair of a batch trains with the batch's β, from the batch's mean gap over all ranks; the
    optional filter keeps the pairs whose gaps lie closest to the running mean."""

    def __init__(self, kl: KlController, dist: DistInfo, device: torch.device, rule: BetaDPORule) -> None:
        super().__init__(kl, dist, device)
        self.rule = rule

    def pair_betas(self, pair_ids: np.ndarray, logps: PairLogps, *, train: bool) -> PairBetas:
        gaps = logps.implicit_gaps(self.rule.beta0)
        if not train:
            return PairBetas(torch.full_like(gaps, self.rule.beta0), None, 1.0)
        super().pair_betas(pair_ids, logps, train=True)  # the ledger still books every pair
        beta = self.rule.batch_beta(self._global_mean_gap(gaps.sum().item(), float(gaps.numel())))
        if self.rule.filter_fraction is None:
            return PairBetas(torch.full_like(gaps, beta), None, 1.0)
        return PairBetas(torch.full_like(gaps, beta), self.rule.keep(gaps), self.rule.filter_fraction)

    def empty_micro_batch(self) -> None:
        self._global_mean_gap(0.0, 0.0)  # the other ranks' all-reduce of their gaps waits for this one

    def _global_mean_gap(self, gap_sum: float, count: float) -> float:
        total = all_reduce_sum(torch.tensor([gap_sum, count], dtype=torch.float64), self.dist)
        return float(total[0] / total[1]) if total[1] > 0 else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"running_gap": self.rule.running_gap}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.running_gap = state.get("running_gap")


class BetaDPO(SigmoidMethod):
    title: ClassVar[str] = "β-DPO"
    own_fields: ClassVar[tuple[str, ...]] = ("beta_dpo_alpha", "beta_dpo_momentum", "beta_dpo_filter")

    def make_beta_rule(self, config: MethodSettings, kl: KlController, dist: DistInfo,
                       device: torch.device) -> KlControlledBeta:
        rule = BetaDPORule(config.beta, config.beta_dpo_alpha, config.beta_dpo_momentum, config.beta_dpo_filter)
        return BatchAdaptiveBeta(kl, dist, device, rule)

    @classmethod
    def checks(cls, config: MethodSettings) -> list[Check]:
        return [(config.beta_min is None, "beta_min", config.beta_min,
                 "None with method='beta_dpo': it floors ε-DPO's base β, not β-DPO's batch β")]
