"""What the trainer asks of a method (`Method`), and the parts every method here shares.

A method owns, in one object: its per-pair β rule and step signal (`beta_rule`, `pair_steps`), its
loss (`loss`), its derived settings (ε_s, ε_c, whether the reference moves: classmethods read from
the config, so the config and the run identity ask the method instead of comparing names), its own
config checks and fields, and its model-card rows. The trainer calls only what `Method` declares.

`SigmoidMethod` is the shared implementation: β from the Rust `KlController` at ε = 0 (β fixed,
every pair booked in the ledger), TRL's sigmoid DPO loss, and TR-DPO's reference update when
`sync_ref_model` asks for it, which any method may. A method file overrides what differs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from epsdpo._core import KlController
from epsdpo.baselines import soft_update_reference
from epsdpo.beta_rules import KlControlledBeta, PairLogps
from epsdpo.distributed import DistInfo
from epsdpo.loss import epsilon_dpo_loss

if TYPE_CHECKING:
    from epsdpo.methods.settings import MethodSettings
    from epsdpo.scoring import SequenceLogps

Check = tuple[bool, str, Any, str]
"""(holds, field, value, what the value must be): one config check, raised by the config when it fails."""


class Method(Protocol):
    """One training method, as the trainer, the config, the checkpoints and the model card use it."""

    title: ClassVar[str]
    """Its name in prose ("ε-DPO"): the model card's and the progress bar's."""
    loss_type: ClassVar[str]
    """TRL's `loss_type` of the loss it trains (a config must name the same)."""
    own_fields: ClassVar[tuple[str, ...]]
    """The config fields only this method reads: unused by another method, they cannot tell runs apart."""

    beta_rule: KlControlledBeta
    """β per pair of a micro-batch, and β's update after each optimizer step (saved in checkpoints)."""
    after_step: list[Callable[[int], None]]
    """Work after each applied optimizer step, given the step number (TR-DPO's reference update)."""
    moves_reference: bool
    """The reference changes during training, so checkpoints must carry it."""

    @classmethod
    def step_epsilon(cls, config: MethodSettings) -> float:
        """ε_s of the β update β/(1 + ε·s̄); 0 keeps β fixed."""

    @classmethod
    def check_epsilon(cls, config: MethodSettings) -> float:
        """ε_c of the perturbed policies that decide each pair's step; 0 skips that work."""

    @classmethod
    def reference_moves(cls, config: MethodSettings) -> bool:
        """Whether the reference follows the policy during training."""

    @classmethod
    def checks(cls, config: MethodSettings) -> list[Check]:
        """This method's own refusals of a config (the config raises the first that fails)."""

    @classmethod
    def card_rows(cls, config: MethodSettings) -> list[tuple[str, str]]:
        """Model-card settings rows after β (ε and whatever else the method wants said)."""

    def pair_steps(self, seq: SequenceLogps) -> Tensor:
        """Each pair's step s_i ∈ {−1, 0, +1} (long, [pairs]) from a batch's scored sequences."""

    def loss(self, logps: PairLogps, betas: Tensor, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Unreduced (losses, chosen rewards, rejected rewards), each [pairs]; rewards detached."""


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


class SigmoidMethod:
    """DPO's sigmoid loss at a β the KlController keeps fixed (ε = 0); the base of every method here."""

    title: ClassVar[str] = "DPO"
    loss_type: ClassVar[str] = "sigmoid"
    own_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MethodSettings, kl: KlController, dist: DistInfo, device: torch.device,
                 policy: nn.Module, reference: nn.Module | object) -> None:
        self.cdpo_smoothing = config.cdpo_smoothing
        self.epsilon_c = self.check_epsilon(config)
        self.beta_rule = self.make_beta_rule(config, kl, dist, device)
        self.after_step: list[Callable[[int], None]] = []
        self.moves_reference = self.reference_moves(config)
        if self.moves_reference:
            if not isinstance(reference, nn.Module):
                raise ValueError("TR-DPO's reference update (method='tr_dpo' or sync_ref_model=True) moves the "
                                 "reference towards the policy, which needs a reference of its own: pass ref_model= "
                                 "with a PEFT policy")
            self.after_step.append(ReferenceSoftUpdate(reference, policy, config.ref_model_sync_steps,
                                                       config.ref_model_mixup_alpha))

    def make_beta_rule(self, config: MethodSettings, kl: KlController, dist: DistInfo,
                       device: torch.device) -> KlControlledBeta:
        # At ε_s = ε_c = 0 every step is 0, so the controller's β never moves: DPO's fixed β, still booked
        return KlControlledBeta(kl, dist, device)

    @classmethod
    def step_epsilon(cls, config: MethodSettings) -> float:
        return 0.0

    @classmethod
    def check_epsilon(cls, config: MethodSettings) -> float:
        return 0.0

    @classmethod
    def reference_moves(cls, config: MethodSettings) -> bool:
        return config.sync_ref_model

    @classmethod
    def checks(cls, config: MethodSettings) -> list[Check]:
        return []

    @classmethod
    def card_rows(cls, config: MethodSettings) -> list[tuple[str, str]]:
        return [("ε", f"not used by {cls.title}")]

    def pair_steps(self, seq: SequenceLogps) -> Tensor:
        return torch.zeros(seq.policy.shape[0] // 2, dtype=torch.long, device=seq.policy.device)

    def loss(self, logps: PairLogps, betas: Tensor, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        return epsilon_dpo_loss(logps.policy_chosen, logps.policy_rejected, logps.reference_chosen,
                                logps.reference_rejected, betas, self.cdpo_smoothing)
