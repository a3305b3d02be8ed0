"""epsdpo: ε-DPO — DPO whose KL penalty β adapts per preference pair — with a Rust data core.

The data path (token store, truncation, batch layouts, sampling) and the per-pair β bookkeeping
live in Rust (:mod:`epsdpo._core`); the loss (:mod:`epsdpo.loss`), the fused log-prob kernel
(:mod:`epsdpo.ops`) and the training loop (:class:`Trainer`) are PyTorch. Heavy modules load on
first use, so `import epsdpo` stays cheap for data-only work.
"""

from typing import TYPE_CHECKING, Any

from epsdpo._core import (
    BatchSampler,
    Collator,
    ConfigError,
    EpsdpoError,
    InternalError,
    InvalidPairError,
    KlController,
    PreferenceStore,
    StateError,
    StoreFileError,
    Truncation,
    TruncationError,
    __version__,
)

if TYPE_CHECKING:
    from epsdpo.config import TrainConfig
    from epsdpo.config_fields import ConfigFieldError, UnknownConfigKeysError
    from epsdpo.config import TrainConfig as DPOConfig
    from epsdpo.data import load_preferences
    from epsdpo.heads import split_causal_lm
    from epsdpo.loss import epsilon_dpo_loss, kl_steps, pair_betas, pair_log_ratio
    from epsdpo.ops import perturbed_logps, sequence_logps
    from epsdpo.scoring import batch_logps
    from epsdpo.trainer import Trainer
    from epsdpo.trainer import Trainer as DPOTrainer

# TRL's names, so that code written for TRL's DPOTrainer runs with only its import changed
_ALIASES = {"DPOConfig": "TrainConfig", "DPOTrainer": "Trainer"}

_LAZY = {
    "TrainConfig": "epsdpo.config",
    "ConfigFieldError": "epsdpo.config_fields",
    "UnknownConfigKeysError": "epsdpo.config_fields",
    "Trainer": "epsdpo.trainer",
    "load_preferences": "epsdpo.data",
    "perturbed_logps": "epsdpo.ops",
    "sequence_logps": "epsdpo.ops",
    "split_causal_lm": "epsdpo.heads",
    "epsilon_dpo_loss": "epsdpo.loss",
    "kl_steps": "epsdpo.loss",
    "pair_betas": "epsdpo.loss",
    "pair_log_ratio": "epsdpo.loss",
    "batch_logps": "epsdpo.scoring",
}


def __getattr__(name: str) -> Any:
    name = _ALIASES.get(name, name)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'epsdpo' has no attribute {name!r}")


__all__ = [
    "BatchSampler",
    "Collator",
    "ConfigError",
    "ConfigFieldError",
    "DPOConfig",
    "DPOTrainer",
    "EpsdpoError",
    "InternalError",
    "InvalidPairError",
    "KlController",
    "PreferenceStore",
    "StateError",
    "StoreFileError",
    "Trainer",
    "TrainConfig",
    "Truncation",
    "TruncationError",
    "UnknownConfigKeysError",
    "__version__",
    "batch_logps",
    "epsilon_dpo_loss",
    "kl_steps",
    "load_preferences",
    "pair_betas",
    "pair_log_ratio",
    "perturbed_logps",
    "sequence_logps",
    "split_causal_lm",
]
