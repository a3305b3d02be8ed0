"""TR-DPO (Gorbatovski et al., 2024): DPO whose reference moves toward the policy, θ_ref ← α·θ +
(1 − α)·θ_ref every τ optimizer steps (TRL's `sync_ref_model`, `ref_model_sync_steps` = τ,
`ref_model_mixup_alpha` = α; the update itself is `epsdpo.baselines.soft_update_reference`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from epsdpo.methods.base import SigmoidMethod

if TYPE_CHECKING:
    from epsdpo.methods.settings import MethodSettings


class TrDPO(SigmoidMethod):
    title: ClassVar[str] = "TR-DPO"

    @classmethod
    def reference_moves(cls, config: MethodSettings) -> bool:
        return True  # sync_ref_model or not: moving the reference is what TR-DPO is
