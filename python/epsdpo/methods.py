"""The training methods, each assembled from a β rule and its post-step work.

| method        | β per pair (epsdpo.beta_rules)        | after each optimizer step          |
|---------------|---------------------------------------|------------------------------------|
| `epsilon_dpo` | `KlControlledBeta`, ε from the config | the β update                       |
| `dpo`         | `KlControlledBeta` at ε = 0            | —                                  |
| `tr_dpo`      | `KlControlledBeta` at ε = 0            | every τ steps, θ_ref ← α·θ + (1−α)·θ_ref |
| any, with `sync_ref_model=True` | the method's own     | TR-DPO's reference update, as above |
| `beta_dpo`    | `BatchAdaptiveBeta`                   | —                                  |

Adding a method means adding its rule or hook and one entry in `build_method`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from epsdpo._core import KlController
from epsdpo.baselines import BetaDPO, soft_update_reference
from epsdpo.beta_rules import BatchAdaptiveBeta, KlControlledBeta
from epsdpo.config import TrainConfig
from epsdpo.distributed import DistInfo


@dataclass
class ReferenceSoftUpdate:
    """TR-DPO's post-step hook: every `tau` optimizer steps the reference moves toward the policy."""

    reference: nn.Module
    policy: nn.Module
    tau: int
    alpha: float

    def __call__(self, step: int) -> None:
        if step % self.tau == 0:
            soft_update_reference(self.reference, self.policy, self.alpha)


@dataclass
class Method:
    beta_rule: KlControlledBeta
    after_step: list[Callable[[int], None]] = field(default_factory=list)
    moves_reference: bool = False
    """The reference changes during training, so checkpoints must carry it."""


def build_method(config: TrainConfig, kl: KlController, dist: DistInfo, device: torch.device, policy: nn.Module,
                 reference: nn.Module | object) -> Method:
    if config.method == "beta_dpo":
        rule = BetaDPO(config.beta, config.beta_dpo_alpha, config.beta_dpo_momentum, config.beta_dpo_filter)
        method = Method(BatchAdaptiveBeta(kl, dist, device, rule))
    else:  # epsilon_dpo; dpo and tr_dpo are the same rule with ε = 0 (config.step_epsilon)
        method = Method(KlControlledBeta(kl, dist, device))
    if config.moves_reference:  # tr_dpo, or sync_ref_model with any method
        if not isinstance(reference, nn.Module):
            raise ValueError("TR-DPO's reference update (method='tr_dpo' or sync_ref_model=True) moves the reference "
                             "towards the policy, which needs a reference of its own: pass ref_model= with a PEFT policy")
        method.after_step.append(ReferenceSoftUpdate(reference, policy, config.ref_model_sync_steps,
                                                     config.ref_model_mixup_alpha))
        method.moves_reference = True
    return method
