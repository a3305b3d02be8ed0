"""The training methods, one file each, and the registry that maps a config's `method` to one.

| method        | β per pair                          | loss (TRL's `loss_type`) | after each optimizer step |
|---------------|-------------------------------------|--------------------------|---------------------------|
| `dpo`         | fixed β                             | sigmoid                  | —                         |
| `epsilon_dpo` | β/(1 + ε·s_i), base β moves         | sigmoid                  | the β update              |
| `tr_dpo`      | fixed β                             | sigmoid                  | the reference update (a)  |
| `beta_dpo`    | one β per batch (and a data filter) | sigmoid                  | —                         |
| `ipo`         | fixed β (IPO's τ)                   | ipo                      | —                         |

(a) every τ steps, θ_ref ← α·θ + (1 − α)·θ_ref.

Any method with `sync_ref_model=True` also moves its reference as TR-DPO does. What a method is
(`Method`) and the parts they share are in `epsdpo.methods.base`.

Adding a method is one file here and one line in `_REGISTRY` (docs/algorithm.md, 'Add a method'):
the config takes its allowed names from this registry. The registry names modules rather than
importing them, so that reading the names (the config, `epsdpo train --help`) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from epsdpo._core import KlController
    from epsdpo.methods.settings import MethodSettings
    from epsdpo.distributed import DistInfo
    from epsdpo.methods.base import Method

# config name -> "module of epsdpo.methods:class"
_REGISTRY = {
    "dpo": "dpo:DPO",
    "epsilon_dpo": "epsilon_dpo:EpsilonDPO",
    "tr_dpo": "tr_dpo:TrDPO",
    "beta_dpo": "beta_dpo:BetaDPO",
    "ipo": "ipo:IPO",
}
METHOD_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class of the method the config calls `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"method={name!r} is invalid: must be one of {', '.join(map(repr, METHOD_NAMES))}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"epsdpo.methods.{module}"), cls)


def unused_method_fields(name: str) -> set[str]:
    """The config fields other methods own and method `name` never reads."""
    mine = set(method_class(name).own_fields)
    return {f for other in METHOD_NAMES for f in method_class(other).own_fields} - mine


def build_method(config: MethodSettings, kl: KlController, dist: DistInfo, device: torch.device, policy: nn.Module,
                 reference: nn.Module | object) -> Method:
    """The method `config.method` names, ready to train `policy` against `reference`."""
    return method_class(config.method)(config, kl, dist, device, policy, reference)  # type: ignore[call-arg]
