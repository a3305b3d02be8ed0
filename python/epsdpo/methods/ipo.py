"""IPO (Azar et al., 2023), as TRL 1.16's `DPOTrainer(loss_type="ipo")` trains it.

Each pair's log-ratios are averaged over its completion tokens (TRL's normalisation, which the
paper's results use), and the loss pulls their difference toward 1/(2τ), τ = β:

    Δ_i    = (log π_θ(y_w) − log π_ref(y_w)) / |y_w| − (log π_θ(y_l) − log π_ref(y_l)) / |y_l|
    loss_i = (Δ_i − 1/(2β))²

with |y| the completion's scored tokens (at least 1). The rewards logged are TRL's, β times the
summed log-ratios, as for DPO. β stays fixed: ε-DPO's per-pair β is not applied to IPO
(docs/algorithm.md, 'IPO'), so config `loss_type: ipo` goes with `method: ipo` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from epsdpo.beta_rules import PairLogps
from epsdpo.methods.base import Check, SigmoidMethod

if TYPE_CHECKING:
    from epsdpo.methods.settings import MethodSettings


def completion_tokens(batch: Mapping[str, Any], device: torch.device) -> tuple[Tensor, Tensor]:
    """([pairs], [pairs]) scored tokens of each pair's chosen and rejected answer, at least 1."""
    counts = np.bincount(batch["target_sequence"], minlength=batch["num_sequences"])
    chosen, rejected = torch.from_numpy(np.maximum(counts, 1)).to(device).chunk(2)
    return chosen, rejected


def ipo_loss(logps: PairLogps, betas: Tensor, chosen_tokens: Tensor,
             rejected_tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unreduced (losses, chosen_rewards, rejected_rewards), each [pairs]; rewards detached."""
    betas = betas.to(logps.policy_chosen.dtype)
    chosen_ratio = logps.policy_chosen - logps.reference_chosen
    rejected_ratio = logps.policy_rejected - logps.reference_rejected
    delta = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
    losses = (delta - 1 / (2 * betas)) ** 2
    return losses, betas * chosen_ratio.detach(), betas * rejected_ratio.detach()


class IPO(SigmoidMethod):
    title: ClassVar[str] = "IPO"
    loss_type: ClassVar[str] = "ipo"

    @classmethod
    def checks(cls, config: MethodSettings) -> list[Check]:
        return [(config.cdpo_smoothing == 0, "cdpo_smoothing", config.cdpo_smoothing,
                 "0 with method='ipo': conservative DPO smooths the sigmoid loss, IPO's squared loss has no such term")]

    def loss(self, logps: PairLogps, betas: Tensor, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        return ipo_loss(logps, betas, *completion_tokens(batch, logps.policy_chosen.device))
