"""ε-DPO: each pair trains at β_i = β/(1 + ε_s·s_i), its step s_i from whether relaxing or
tightening the KL penalty (by ε_c) raises the pair's log-ratio margin, and the base β moves by the
mean step after each optimizer step (docs/algorithm.md; the math is `epsdpo.loss`, the fused
relaxed/tightened log-probs `epsdpo.ops`, the β bookkeeping the Rust `KlController`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from epsdpo.loss import kl_steps, pair_log_ratio
from epsdpo.methods.base import SigmoidMethod

if TYPE_CHECKING:
    from epsdpo.methods.settings import MethodSettings
    from epsdpo.scoring import SequenceLogps


class EpsilonDPO(SigmoidMethod):
    title: ClassVar[str] = "ε-DPO"

    @classmethod
    def step_epsilon(cls, config: MethodSettings) -> float:
        return config.epsilon

    @classmethod
    def check_epsilon(cls, config: MethodSettings) -> float:
        return config.epsilon if config.epsilon_check is None else config.epsilon_check

    @classmethod
    def card_rows(cls, config: MethodSettings) -> list[tuple[str, str]]:
        return [("ε", f"{cls.check_epsilon(config):g} (ε_c, decides each pair's step), "
                      f"{cls.step_epsilon(config):g} (ε_s, β update)")]

    def pair_steps(self, seq: SequenceLogps) -> Tensor:
        if self.epsilon_c == 0:  # ε_c = 0: no perturbed policies were scored, every step is 0
            return super().pair_steps(seq)
        return kl_steps(pair_log_ratio(seq.policy.detach()), pair_log_ratio(seq.relaxed),
                        pair_log_ratio(seq.tightened))
