"""TRL's `DPOTrainer` call, as epsdpo's `Trainer` takes it.

- `trainer_inputs`: the arguments of `Trainer(...)` in either shape, TRL's
  (`model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class, ...`, by
  keyword or position) or epsdpo's own (`model, config, train_dataset, tokenizer, ref_model,
  eval_dataset`: a config in the second position cannot be a reference model), resolved to what the
  trainer needs. TRL's arguments epsdpo does not take (`data_collator`, `compute_metrics`,
  `optimizers`, `quantization_config`) are refused when given, with the reason.
- `as_train_config`: a TRL `DPOConfig` as a `TrainConfig`. Every field of it is accounted for: one
  `TrainConfig` also has is taken with TRL's meaning; one left at the value DPOConfig itself gives
  it is ignored; any other value is refused by name, with the reason. Nothing set is dropped unread.
- `lora_settings`: a PEFT `LoraConfig` (TRL's `peft_config`) as the config's LoRA fields, so that
  checkpoints record and resume compare them like any other setting.

TRL is not imported here: a DPOConfig is recognised by its class, so epsdpo runs without TRL.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

from epsdpo.config import TrainConfig
from epsdpo.safe_yaml import shown

# TRL 1.16's DPOTrainer parameters after `model`, in its positional order
TRL_ORDER = ("ref_model", "args", "data_collator", "train_dataset", "eval_dataset", "processing_class",
             "compute_metrics", "callbacks", "optimizers", "quantization_config", "peft_config")
# epsdpo's earlier signature, still taken when the second argument is a config
LEGACY_ORDER = ("config", "train_dataset", "tokenizer", "ref_model", "eval_dataset")
# Same argument, two names: TRL's first, epsdpo's earlier one second
ALIASES = (("args", "config"), ("processing_class", "tokenizer"))
# TRL's trainer arguments epsdpo has no use for, each with what to do instead
REFUSED_ARGUMENTS = {
    "data_collator": "epsdpo batches pairs with its own Rust collator, which the fused loss needs; choose its "
                     "batch layout with the config's layout (padded, packed, shared_prompt)",
    "compute_metrics": "evaluate() returns the loss and TRL's reward metrics (eval_rewards/...); compute other "
                       "metrics from the saved model",
    "optimizers": "epsdpo builds AdamW and its schedule from the config (learning_rate, weight_decay, adam_beta1, "
                  "adam_beta2, lr_scheduler_type, warmup_steps), which checkpoints save and resume",
    "quantization_config": "trained weights must be float32 (docs/precision.md), and epsdpo loads no quantized "
                           "model",
}
# DPOConfig fields with a meaning here under another name: the field, and what it sets
RENAMED = {"use_cpu": "device", "disable_tqdm": "progress"}
# transformers 5's new names of fields TrainConfig has under the old ones: TrainingArguments keeps the
# two equal, so the old name's value decides
MIRRORS = {"activation_checkpointing": "gradient_checkpointing",
           "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs"}
NOT_TAKEN = object()


class TrlSettingError(ValueError):
    """A TRL setting or argument epsdpo does not do; the message names it, its value and why."""


# Why some common DPOConfig fields are refused; the others get the general reason
REASONS = {
    "resume_from_checkpoint": "TRL's trainer does not read it either (scripts do): pass it to "
                              "trainer.train(resume_from_checkpoint=...)",
    "deepspeed": "epsdpo shards with FSDP2: set fsdp=True (the config's fsdp) under torchrun",
    "torch_compile": "epsdpo does not compile the model; its log-prob kernel is fused already",
    "adam_epsilon": "epsdpo's AdamW uses torch's default eps, 1e-8 (DPOConfig's default)",
    "gradient_checkpointing_kwargs": "only {'use_reentrant': False}: epsdpo checkpoints without reentrancy, which "
                                     "DDP needs",
    "use_liger_kernel": "epsdpo's fused log-prob kernel is built in",
}


def _reason(name: str) -> str:
    """Why DPOConfig's `name` is refused when set (the one place to give a field its reason)."""
    return REASONS.get(name, f"epsdpo has no {name} setting; leave it at DPOConfig's default (the README's "
                             "'Coming from TRL')")


def refuse(name: str, value: Any, reason: str) -> TrlSettingError:
    return TrlSettingError(f"{name}={shown(value)} is not supported: {reason}")


# ------------------------------------------------------------------------- the Trainer's arguments
class TrainerInputs(NamedTuple):
    """What `Trainer(...)` was given, in one shape."""

    config: TrainConfig
    ref_model: Any
    train_dataset: Any
    eval_dataset: Any
    tokenizer: Any
    callbacks: list[Any]


def is_config(value: Any) -> bool:
    return isinstance(value, TrainConfig) or is_dpo_config(value)


def is_dpo_config(value: Any) -> bool:
    """A TRL `DPOConfig` (or a subclass), recognised without importing TRL."""
    return any(cls.__name__ == "DPOConfig" and cls.__module__.startswith("trl.") for cls in type(value).__mro__)


def trainer_inputs(model: Any, positional: tuple[Any, ...], keywords: dict[str, Any]) -> TrainerInputs:
    """`Trainer(model, *positional, **keywords)` resolved. `keywords` holds every keyword parameter
    with its value (None, or `(None, None)` for optimizers, when not given)."""
    given = _bind(positional, dict(keywords))
    for name, reason in REFUSED_ARGUMENTS.items():
        value = given.pop(name)
        if _given(value):
            raise refuse(name, value, reason)
    for trl_name, own_name in ALIASES:
        if given[trl_name] is not None and given[own_name] is not None:
            raise TypeError(f"Trainer() got both {trl_name}= and {own_name}=, two names of one argument: pass one")
        given[trl_name] = given[trl_name] if given[trl_name] is not None else given[own_name]
    if given["train_dataset"] is None:
        raise TypeError("Trainer() needs train_dataset: a datasets.Dataset, a PreferenceStore or a data file")
    if isinstance(given["eval_dataset"], Mapping):
        # TRL evaluates each entry under its own metric prefix; evaluating one of them would be another thing
        raise refuse("eval_dataset", list(given["eval_dataset"]), "one dataset, not several named ones (a dict or "
                     "DatasetDict): pass one of them, e.g. eval_dataset['test']")
    config = _as_config(given["args"], model)
    if given["peft_config"] is not None:
        if config.use_peft:
            raise TypeError("Trainer() got peft_config= and a config with use_peft=True, two requests for "
                            "adapters: pass one")
        config = dataclasses.replace(config, use_peft=True, **lora_settings(given["peft_config"]))
    return TrainerInputs(config, given["ref_model"], given["train_dataset"], given["eval_dataset"],
                         given["processing_class"], list(given["callbacks"] or []))


def _bind(positional: tuple[Any, ...], given: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments after `model` into `given`, by TRL's order or, when the first is a config,
    by epsdpo's earlier one."""
    order = LEGACY_ORDER if positional and is_config(positional[0]) else TRL_ORDER
    if len(positional) > len(order):
        raise TypeError(f"Trainer() takes at most {len(order) + 1} positional arguments in this form "
                        f"({', '.join(('model', *order))}), {len(positional) + 1} given; pass the rest by keyword")
    for name, value in zip(order, positional):
        if _given(given[name]):
            raise TypeError(f"Trainer() got multiple values for argument {name!r}")
        given[name] = value
    return given


def _given(value: Any) -> bool:
    """Whether a keyword parameter holds something other than its default (None; optimizers: (None, None))."""
    return value is not None and not (isinstance(value, tuple) and value == (None, None))


def _as_config(args: Any, model: Any) -> TrainConfig:
    if args is None:  # TRL's default: DPOConfig(f"{model_name}-DPO")
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        return TrainConfig(output_dir=f"{str(name).split('/')[-1]}-DPO")
    if isinstance(args, TrainConfig):
        return args
    if is_dpo_config(args):
        return as_train_config(args)
    raise TypeError(f"args must be an epsdpo TrainConfig or a TRL DPOConfig, got a {type(args).__name__}")


# ------------------------------------------------------------------------------- DPOConfig fields
def as_train_config(args: Any) -> TrainConfig:
    """The `TrainConfig` a TRL `DPOConfig` asks for (see the module docstring); raises
    `TrlSettingError` (or TrainConfig's ValueError) naming the first field it cannot honour."""
    ours = {f.name for f in dataclasses.fields(TrainConfig)}
    fields = [f.name for f in dataclasses.fields(args) if f.init]
    shared = [name for name in fields if name in ours]
    taken = {name: _plain(name, getattr(args, name)) for name in shared}
    for name, target in RENAMED.items():
        value = getattr(args, name, NOT_TAKEN)
        if value is not NOT_TAKEN and target not in taken:
            taken.update(_renamed(name, value))
    config = TrainConfig(**taken)  # the shared fields are checked here, each error naming its field
    defaults = _defaults_like(args, shared + list(RENAMED))
    for name in fields:
        if name in shared or name in RENAMED:
            continue
        value = getattr(args, name)
        if name in MIRRORS and _same(value, getattr(args, MIRRORS[name], NOT_TAKEN)):
            continue
        if name == "gradient_checkpointing_kwargs" and value == {"use_reentrant": False}:
            continue  # what epsdpo's gradient checkpointing does (TRL's docs spell it out)
        if name == "fsdp_config" and value is not None:
            if _is_full_shard(value):
                continue
            raise refuse(name, value, "only the settings of epsdpo's FSDP2: version 2, full sharding "
                                      "(reshard_after_forward), one unit per transformer block, no CPU offload")
        if not _same(value, getattr(defaults, name)):
            raise refuse(name, value, _reason(name))
    return config


def _plain(name: str, value: Any) -> Any:
    """A shared field's DPOConfig value in TrainConfig's form, with the same meaning."""
    if isinstance(value, enum.Enum):  # transformers' IntervalStrategy, SchedulerType, ...
        value = value.value
    if name == "report_to" and isinstance(value, list):
        # [] is TRL's `none`: no logging integration, which here is metrics.jsonl alone (TRL keeps
        # its log history in trainer_state.json either way); epsdpo's own `none` would write nothing
        names = [getattr(v, "value", v) for v in value]
        return "jsonl" if not names else names[0] if len(names) == 1 else names
    if name == "fsdp":
        return _fsdp(value)
    if name == "pad_to_multiple_of" and value is None:
        return 1  # TRL's None: no padding to a multiple
    return value


def _fsdp(value: Any) -> Any:
    """transformers' fsdp as epsdpo's switch. transformers 5 turns its older option strings into True
    and fsdp_config entries (which then decide, as fields of their own); full sharding is FSDP2's."""
    if isinstance(value, bool):
        return value
    if value is None or value == "" or value == []:
        return False
    if isinstance(value, str):
        value = value.split()
    options = {getattr(v, "value", v) for v in value} if isinstance(value, (list, tuple)) else None
    if options is not None and "full_shard" in options and options <= {"full_shard", "auto_wrap"}:
        return True
    raise refuse("fsdp", value, "only full_shard (with or without auto_wrap): epsdpo's fsdp is FSDP2's full "
                                "sharding, one unit per transformer block")


# fsdp_config entries that describe what epsdpo's FSDP2 does anyway (what transformers fills in for
# fsdp=True or fsdp="full_shard auto_wrap")
FULL_SHARD = {"version": 2, "reshard_after_forward": True, "min_num_params": 0, "xla": False, "xla_fsdp_v2": False,
              "xla_fsdp_grad_ckpt": False, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}


def _is_full_shard(value: Any) -> bool:
    return isinstance(value, dict) and all(FULL_SHARD.get(k, NOT_TAKEN) == v for k, v in value.items())


def _renamed(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, bool):
        raise refuse(name, value, "True or False")
    if name == "use_cpu":
        return {"device": "cpu"} if value else {}
    return {"progress": not value}  # disable_tqdm


def _defaults_like(args: Any, accepted: list[str]) -> Any:
    """A DPOConfig of the same class with the fields epsdpo takes copied from `args` and every other
    field left at its default: what DPOConfig's own __post_init__ makes of an unset field can depend
    on the set ones (do_eval follows eval_strategy, the mirrored names follow the old ones), so a
    value equal to this one's is one the user did not choose."""
    copied = {name: getattr(args, name) for name in accepted if hasattr(args, name)}
    quiet = logging.getLogger("transformers")
    level = quiet.level
    # the warnings and log lines of this construction were the user's, given once already
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet.setLevel(logging.ERROR)
        try:
            return type(args)(**copied)
        finally:
            quiet.setLevel(level)


def _same(value: Any, default: Any) -> bool:
    try:
        return bool(value == default) or _plain("", value) == _plain("", default)
    except Exception:  # a value whose comparison fails is not the default
        return False


# ------------------------------------------------------------------------------------- peft_config
LORA_FIELDS = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
               "target_modules": "lora_target_modules"}


def lora_settings(peft_config: Any) -> dict[str, Any]:
    """A PEFT `LoraConfig` as TrainConfig's LoRA fields; any other of its fields set to a value of
    its own is refused by name (epsdpo builds the adapters from those four)."""
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        raise refuse("peft_config", peft_config, "only a peft LoraConfig (LoRA adapters); other PEFT methods "
                                                 "are not implemented")
    default = LoraConfig()
    for f in dataclasses.fields(peft_config):
        value = getattr(peft_config, f.name)
        if f.name in LORA_FIELDS or (f.name == "task_type" and _plain("", value) in (None, "CAUSAL_LM")):
            continue
        if not _same(value, getattr(default, f.name)):
            raise refuse(f"peft_config.{f.name}", value, "epsdpo's LoRA takes r, lora_alpha, lora_dropout and "
                                                         "target_modules; leave the rest at LoraConfig's default")
    modules = peft_config.target_modules
    return {"lora_r": peft_config.r, "lora_alpha": peft_config.lora_alpha,
            "lora_dropout": float(peft_config.lora_dropout),
            "lora_target_modules": sorted(modules) if isinstance(modules, (set, frozenset, list)) else modules}
