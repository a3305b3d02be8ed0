"""The settings a method reads, as a protocol that `TrainConfig` satisfies.

The methods name this protocol rather than `TrainConfig`: the config imports the methods' registry
(for the names `method` accepts and each method's own checks), so a method importing the config,
even for type checkers only, would tie the two into one circle. A method that reads a setting not
listed here adds it (the config field of that name must exist: tests/test_import_graph.py checks).
"""

from __future__ import annotations

from typing import Protocol


class MethodSettings(Protocol):
    """The config fields the methods read, read-only."""

    @property
    def method(self) -> str: ...
    @property
    def beta(self) -> float: ...
    @property
    def beta_min(self) -> float | None: ...
    @property
    def epsilon(self) -> float: ...
    @property
    def epsilon_check(self) -> float | None: ...
    @property
    def cdpo_smoothing(self) -> float: ...
    @property
    def sync_ref_model(self) -> bool: ...
    @property
    def ref_model_sync_steps(self) -> int: ...
    @property
    def ref_model_mixup_alpha(self) -> float: ...
    @property
    def beta_dpo_alpha(self) -> float: ...
    @property
    def beta_dpo_momentum(self) -> float: ...
    @property
    def beta_dpo_filter(self) -> float | None: ...
