"""`TrainConfig`: every knob of a training run, validated at construction.

Names follow TRL's `DPOConfig` / `TrainingArguments` where the concept is the same, so a TRL user's
YAML mostly carries over.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

METHODS = ("epsilon_dpo", "dpo", "tr_dpo", "beta_dpo")
LAYOUTS = ("padded", "packed", "shared_prompt")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
DTYPES = ("float32", "bfloat16", "float16")
REPORTERS = ("none", "jsonl", "tensorboard", "wandb")
TRUNCATION_MODES = ("keep_end", "keep_start")


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
    layout: Literal["padded", "packed", "shared_prompt"] = "padded"
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
    report_to: Literal["none", "jsonl", "tensorboard", "wandb"] = "jsonl"
    plots: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        _check(self.dtype is None or self.dtype in DTYPES, "dtype", self.dtype,
               "None or one of " + ", ".join(repr(d) for d in DTYPES))
        _check(not (self.bf16 and self.fp16), "fp16", self.fp16, "False when bf16=True (choose one compute precision)")
        _check_choice("report_to", self.report_to, REPORTERS)
        _check_choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)
        _check(self.beta > 0 and math.isfinite(self.beta), "beta", self.beta, "a finite number > 0")
        _check(0 <= self.epsilon < 1, "epsilon", self.epsilon, "in [0, 1)")
        _check(self.epsilon_check is None or 0 <= self.epsilon_check < 1, "epsilon_check", self.epsilon_check,
               "None or in [0, 1)")
        _check(self.tr_dpo_tau >= 1, "tr_dpo_tau", self.tr_dpo_tau, "an integer >= 1")
        _check(0 < self.tr_dpo_alpha <= 1, "tr_dpo_alpha", self.tr_dpo_alpha, "in (0, 1]")
        _check(0 <= self.beta_dpo_momentum < 1, "beta_dpo_momentum", self.beta_dpo_momentum, "in [0, 1)")
        _check(self.beta_dpo_filter is None or 0 < self.beta_dpo_filter <= 1, "beta_dpo_filter",
               self.beta_dpo_filter, "None or in (0, 1]")
        _check(0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "in [0, 0.5)")
        _check(self.learning_rate >= 0, "learning_rate", self.learning_rate, ">= 0")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "pad_to_multiple_of"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        _check(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs", self.num_train_epochs,
               "> 0 (or set max_steps > 0)")
        _check(0 <= self.warmup_ratio <= 1, "warmup_ratio", self.warmup_ratio, "in [0, 1]")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, ">= 0 (0 disables clipping)")
        for name in ("eval_steps", "save_steps", "save_total_limit", "max_tokens_per_batch", "chunk_size"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, value, "None or an integer >= 1")
        if self.max_length is not None and self.max_prompt_length is not None:
            _check(self.max_prompt_length < self.max_length, "max_prompt_length", self.max_prompt_length,
                   f"below max_length ({self.max_length})")

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


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, name, value, "one of " + ", ".join(repr(c) for c in choices))
