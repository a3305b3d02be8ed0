"""epsdpo: ε-DPO — DPO whose KL penalty β adapts per preference pair — with a Rust data core.

The data path (token store, truncation, batch layouts, sampling) and the per-pair β bookkeeping
live in Rust (:mod:`epsdpo._core`); the loss and the fused log-prob kernel are PyTorch
(:mod:`epsdpo.loss`, :mod:`epsdpo.ops`).
"""

from epsdpo._core import (
    BatchSampler,
    Collator,
    ConfigError,
    EpsdpoError,
    InvalidPairError,
    KlController,
    PreferenceStore,
    StateError,
    StoreFileError,
    TruncationError,
    __version__,
)

__all__ = [
    "BatchSampler",
    "Collator",
    "ConfigError",
    "EpsdpoError",
    "InvalidPairError",
    "KlController",
    "PreferenceStore",
    "StateError",
    "StoreFileError",
    "TruncationError",
    "__version__",
]
