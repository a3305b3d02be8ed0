"""DPO (Rafailov et al., 2023): TRL's `loss_type: sigmoid` at a fixed β; ε-DPO at ε = 0.

Everything it does is the shared `SigmoidMethod`; this file gives it its name.
"""

from __future__ import annotations

from typing import ClassVar

from epsdpo.methods.base import SigmoidMethod


class DPO(SigmoidMethod):
    title: ClassVar[str] = "DPO"
