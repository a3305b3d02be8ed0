"""`TrainConfig`: every knob of a training run, validated at construction.

Names follow TRL's `DPOConfig` / `TrainingArguments` where the concept is the same, so a TRL user's
YAML mostly carries over.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Layout = Literal["padded", "packed", "shared_prompt"]
LAYOUTS: tuple[str, ...] = typing.get_args(Layout)  # the batch layouts of the Rust collator


@dataclass
class TrainConfig:
    output_dir: str = "outputs/epsdpo"
    # ε-DPO (docs/algorithm.md, 'The step rule')
    method: Literal["epsilon_dpo", "dpo", "tr_dpo", "beta_dpo"] = "epsilon_dpo"
    beta: float = 0.1
    epsilon: float = 0.01
    # ε of the perturbation check when it should differ from the step size ε (the paper's ε_c/ε_s
    # ablation); None uses `epsilon` for both.
    epsilon_check: float | None = None
    label_smoothing: float = 0.0
    # baselines (epsdpo.baselines): TR-DPO soft reference update, β-DPO batch β and data filter
    tr_dpo_tau: int = 128
    tr_dpo_alpha: float = 0.6
    beta_dpo_alpha: float = 0.6
    beta_dpo_momentum: float = 0.9
    beta_dpo_filter: float | None = None
    # optimisation
    learning_rate: float = 5e-7
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    # data
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    layout: Layout = "padded"
    group_by_length: bool = False
    max_tokens_per_batch: int | None = None
    pad_to_multiple_of: int = 1
    skip_invalid: bool = False
    dataset_cache_dir: str | None = None
    # runtime
    seed: int = 42
    device: str | None = None  # None: this rank's CUDA device when one is visible, else the CPU
    # Precision (docs/precision.md). `dtype` is how the weights are stored: a model loaded from a path
    # is loaded in it (None: float32), a model object is cast to it (None: kept as given). Trained
    # weights must be float32, because an AdamW update at DPO's learning rates is smaller than half a
    # bf16 ulp of the weight and rounds away; a frozen reference may be stored in any precision.
    # `bf16` / `fp16` choose the compute precision: autocast over the float32 weights (TRL's meaning),
    # with a gradient scaler for fp16.
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of replicating
    chunk_size: int | None = None  # scored positions per kernel chunk; None: the device default (epsdpo.ops)
    # logging, evaluation, checkpoints
    logging_steps: int = 1
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = None
    # A fresh run refuses an output_dir holding another run's checkpoints or metrics; True clears them
    # first (TRL/transformers' meaning). Resuming never needs it.
    overwrite_output_dir: bool = False
    report_to: Literal["none", "jsonl", "tensorboard", "wandb"] = "jsonl"
    plots: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self._check_types()
        _check(not (self.bf16 and self.fp16), "fp16", self.fp16, "False when bf16=True (choose one compute precision)")
        _check(self.beta > 0, "beta", self.beta, "a finite number > 0")
        _check(0 <= self.epsilon < 1, "epsilon", self.epsilon, "in [0, 1)")
        _check(self.epsilon_check is None or 0 <= self.epsilon_check < 1, "epsilon_check", self.epsilon_check,
               "None or in [0, 1)")
        _check(self.tr_dpo_tau >= 1, "tr_dpo_tau", self.tr_dpo_tau, "an integer >= 1")
        _check(0 < self.tr_dpo_alpha <= 1, "tr_dpo_alpha", self.tr_dpo_alpha, "in (0, 1]")
        _check(self.beta_dpo_alpha >= 0, "beta_dpo_alpha", self.beta_dpo_alpha, "a finite number >= 0")
        _check(0 <= self.beta_dpo_momentum < 1, "beta_dpo_momentum", self.beta_dpo_momentum, "in [0, 1)")
        _check(self.beta_dpo_filter is None or 0 < self.beta_dpo_filter <= 1, "beta_dpo_filter",
               self.beta_dpo_filter, "None or in (0, 1]")
        _check(0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "in [0, 0.5)")
        _check(self.learning_rate >= 0, "learning_rate", self.learning_rate, "a finite number >= 0")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "pad_to_multiple_of"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        _check(self.max_steps == -1 or self.max_steps >= 1, "max_steps", self.max_steps, "-1 (unset) or an integer >= 1")
        _check(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs", self.num_train_epochs,
               "a finite number > 0 (or set max_steps >= 1)")
        _check(0 <= self.warmup_ratio <= 1, "warmup_ratio", self.warmup_ratio, "in [0, 1]")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a finite number >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, name, getattr(self, name), "in [0, 1)")
        _check(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "a finite number >= 0 (0 disables clipping)")
        for name in ("max_length", "max_prompt_length", "eval_steps", "save_steps", "save_total_limit",
                     "max_tokens_per_batch", "chunk_size"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, value, "None or an integer >= 1")
        _check(0 <= self.seed < 2**32, "seed", self.seed, "an integer in [0, 2**32)")
        _check(bool(self.output_dir), "output_dir", self.output_dir, "a non-empty path")
        if self.max_length is not None and self.max_prompt_length is not None:
            _check(self.max_prompt_length < self.max_length, "max_prompt_length", self.max_prompt_length,
                   f"below max_length ({self.max_length})")

    def _check_types(self) -> None:
        """Every field against its annotation: choices for Literals, exact types for bool/int/str,
        finite numbers for floats (ints are accepted and widened). The error names the field."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = _allowed_types(hints[f.name])
            if value is None and type(None) in allowed:
                continue
            literal = next((a for a in allowed if typing.get_origin(a) is Literal), None)
            if literal is not None:
                _check(value in typing.get_args(literal), f.name, value,
                       "one of " + ", ".join(repr(c) for c in typing.get_args(literal))
                       + (" or None" if type(None) in allowed else ""))
            elif float in allowed:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                _check(ok, f.name, value, "a finite number" + (" or None" if type(None) in allowed else ""))
                setattr(self, f.name, float(value))
            else:
                kind = next(a for a in allowed if a is not type(None))
                ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
                _check(ok, f.name, value, f"{'an integer' if kind is int else 'a ' + kind.__name__}"
                       + (" or None" if type(None) in allowed else ""))

    @property
    def compute_dtype(self) -> str | None:
        """The autocast precision of forward passes; None runs them in the weights' own precision."""
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else None

    @property
    def step_epsilon(self) -> float:
        """ε_s of the β update β/(1 + ε·s); every other method keeps β fixed (ε = 0)."""
        return self.epsilon if self.method == "epsilon_dpo" else 0.0

    @property
    def check_epsilon(self) -> float:
        """ε_c of the perturbed policies; 0 skips the perturbation work entirely."""
        if self.method != "epsilon_dpo":
            return 0.0
        return self.epsilon if self.epsilon_check is None else self.epsilon_check

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
        data.update(overrides or {})
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _numeric(v, hints[k]) for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def parse_override(cls, text: str) -> tuple[str, Any]:
        """`key=value` from the command line, the value coerced to the field's type."""
        key, sep, raw = text.removeprefix("--").partition("=")
        key = key.replace("-", "_")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not sep or key not in fields:
            raise ValueError(f"expected --key=value with key one of {sorted(fields)}, got {text!r}")
        return key, _coerce(raw, typing.get_type_hints(cls)[key])


def _coerce(raw: str, hint: Any) -> Any:
    import yaml

    value = yaml.safe_load(raw)  # numbers, booleans, null as YAML reads them
    if str in (hint, *typing.get_args(hint)) and value is not None and not isinstance(value, str):
        return raw
    return _numeric(value, hint)


def _numeric(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads `1e-5` as a string and `3` as an int; numeric fields want numbers."""
    types = (hint, *typing.get_args(hint))
    if float in types and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    if int in types and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    return value


def _allowed_types(hint: Any) -> tuple[Any, ...]:
    """`int | None` → (int, NoneType); `Literal[...] | None` → (Literal[...], NoneType); `bool` → (bool,)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")
