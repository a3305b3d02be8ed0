"""A step's (or an evaluation's) metrics: named sums over pairs, summed over ranks in one message,
turned into TRL's metric names (`rewards/margins`, `logps/chosen`, ...) plus ε-DPO's `kl/*`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from epsdpo.beta_rules import PairLogps
from epsdpo.distributed import DistInfo, all_reduce_sum

_NAMES = ("pairs", "beta", "loss", "reward_chosen", "reward_rejected", "correct", "logp_chosen", "logp_rejected",
          "relaxed", "tightened", "step_sum", "real_tokens", "all_tokens")


class StepSums:
    def __init__(self) -> None:
        self.values = torch.zeros(len(_NAMES), dtype=torch.float64)

    def __getitem__(self, name: str) -> float:
        return float(self.values[_NAMES.index(name)])

    def add(self, logps: PairLogps, betas: Tensor, losses: Tensor, reward_chosen: Tensor, reward_rejected: Tensor,
            batch: Mapping[str, Any]) -> None:
        """One micro-batch's pairs (tensors are detached and read once, in a single transfer)."""
        mask = batch["attention_mask"]
        named = {
            "pairs": float(len(losses)), "beta": betas.sum(), "loss": losses.detach().sum(),
            "reward_chosen": reward_chosen.sum(), "reward_rejected": reward_rejected.sum(),
            "correct": (reward_chosen > reward_rejected).sum(),
            "logp_chosen": logps.policy_chosen.detach().sum(), "logp_rejected": logps.policy_rejected.detach().sum(),
            "relaxed": (logps.steps > 0).sum(), "tightened": (logps.steps < 0).sum(), "step_sum": logps.steps.sum(),
            "real_tokens": float(mask.sum()), "all_tokens": float(mask.size),
        }
        values = torch.stack([torch.as_tensor(named[name], dtype=torch.float64, device=losses.device)
                              for name in _NAMES])
        self.values += values.cpu()

    def all_reduce(self, dist: DistInfo) -> StepSums:
        all_reduce_sum(self.values, dist)
        return self

    def metrics(self, prefix: str = "") -> dict[str, float]:
        s = dict(zip(_NAMES, self.values.tolist()))
        n = max(s["pairs"], 1.0)
        return {
            f"{prefix}loss": s["loss"] / n,
            f"{prefix}rewards/chosen": s["reward_chosen"] / n,
            f"{prefix}rewards/rejected": s["reward_rejected"] / n,
            f"{prefix}rewards/accuracies": s["correct"] / n,
            f"{prefix}rewards/margins": (s["reward_chosen"] - s["reward_rejected"]) / n,
            f"{prefix}logps/chosen": s["logp_chosen"] / n,
            f"{prefix}logps/rejected": s["logp_rejected"] / n,
            f"{prefix}kl/relaxed_frac": s["relaxed"] / n,
            f"{prefix}kl/tightened_frac": s["tightened"] / n,
            f"{prefix}kl/mean_step": s["step_sum"] / n,
            f"{prefix}kl/pair_beta_mean": s["beta"] / n,
            f"{prefix}padding_fraction": 1.0 - s["real_tokens"] / max(s["all_tokens"], 1.0),
        }
