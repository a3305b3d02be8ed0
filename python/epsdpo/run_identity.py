"""Which settings define what a run trains, so that a resumed run is the run its checkpoint belongs to.

A checkpoint restores the KL controller (β and ε), the sampler, the optimizer and the scheduler of
the run that wrote it; a resumed run that asks for another β, ε, method, learning rate or dataset
would otherwise train with the checkpoint's values while its config and model card show its own.
So every checkpoint records its run's identity (`epsdpo_state.json`, "run_identity"): the
TrainConfig fields that decide training, with facts of the run itself (the schedule's total
optimizer steps, warm-up steps, world size, and fingerprints of the tokenized training data and of
the tokenizer). `resume_run` compares it with the resuming run's and refuses any difference, listing
each `field: checkpoint → this run`.

Three kinds of field:

- free (`FREE_ON_RESUME`): where outputs go, logging, evaluation, saving, progress, caching and how a
  step is computed (chunk size, device, gradient checkpointing): a resumed run simply uses its own.
- changeable (`CHANGEABLE_ON_RESUME`): optimizer and schedule settings that a resumed run can
  honour from the checkpoint's step on (`resume_run` applies them over the restored optimizer and
  scheduler state) — only when listed in `resume_allow_changes`, and recorded in the checkpoints'
  "resumes" and on the model card. `max_steps` (or `num_train_epochs`) is free under a schedule that
  does not depend on the total (constant, constant_with_warmup with a warm-up count): under linear
  or cosine decay a new total changes the learning rate of every remaining step, so it is a
  changeable field there.
- fixed: everything else (method, β, ε, batch geometry, data, truncation, seed, world size, ...): the
  restored β ledger, sampler position and reference belong to the checkpoint's values, so they
  cannot change on resume; listing one in `resume_allow_changes` is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import TYPE_CHECKING, Any

from epsdpo.config_fields import ConfigFieldError
from epsdpo.methods import unused_method_fields

if TYPE_CHECKING:
    from epsdpo.config import TrainConfig

FREE_ON_RESUME = frozenset({
    "output_dir", "overwrite_output_dir", "resume_allow_changes",
    "logging_strategy", "logging_steps", "report_to", "run_name", "progress", "plots",
    "eval_strategy", "eval_steps", "per_device_eval_batch_size",
    "save_strategy", "save_steps", "save_total_limit", "save_only_model", "push_to_hub",
    "metric_for_best_model", "greater_is_better", "load_best_model_at_end",
    "dataset_cache_dir", "dataset_num_proc", "remove_unused_columns", "trust_remote_code",
    # how a step is computed, not what it computes
    "device", "ddp_timeout", "chunk_size", "gradient_checkpointing", "gradient_checkpointing_kwargs",
    "attn_implementation", "tf32", "optim", "logging_first_step",
    "precompute_ref_log_probs", "precompute_ref_batch_size",
    # compared through what they decide: layout, the schedule's total and warm-up steps, the template the
    # tokenizer's fingerprint holds (the file may move), the rows the data's fingerprint holds
    "padding_free", "max_steps", "num_train_epochs", "warmup_steps", "warmup_ratio",
    "chat_template_path", "max_row_bytes", "torch_dtype",
    # a sharded checkpoint resumes only into a sharded run: load_checkpoint refuses that by name
    "fsdp",
})

# Identity key → what it means, where the key is not simply the field of that name.
DERIVED = {
    "max_steps": "the schedule's total optimizer steps, from max_steps or num_train_epochs",
    "warmup_steps": "warm-up optimizer steps, from warmup_steps or warmup_ratio",
    "epsilon": "ε_s of the β update; 0 unless method=epsilon_dpo",
    "epsilon_check": "ε_c of each pair's step; 0 unless method=epsilon_dpo",
    "world_size": "processes",
    "train_data": "fingerprint of the tokenized training pairs",
    "tokenizer": "fingerprint of the tokenizer",
}

CHANGEABLE_ON_RESUME = ("max_steps", "warmup_steps", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs",
                        "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm")
# Other names a user may list for a changeable identity key.
ALIASES = {"num_train_epochs": "max_steps", "warmup_ratio": "warmup_steps"}

# Schedules whose learning rate at a step depends on the total number of steps
TOTAL_DEPENDENT_SCHEDULES = ("linear", "cosine", "cosine_with_min_lr")


class UnverifiedResumeWarning(UserWarning):
    """A checkpoint written before run identities were recorded: its data and tokenizer are not compared."""


def check_allow_list(names: list[str]) -> None:
    """`resume_allow_changes` names only changeable fields; raises ValueError naming the first other."""
    for name in names:
        if ALIASES.get(name, name) not in CHANGEABLE_ON_RESUME:
            kind = "always free to change on resume" if name in FREE_ON_RESUME else "fixed by the checkpoint"
            may_list = ", ".join(CHANGEABLE_ON_RESUME + tuple(ALIASES))
            raise ConfigFieldError("resume_allow_changes", names, f"a list of {may_list}",
                                   reason=f"{name!r} is {kind}; it may list {may_list}")


def identity(config: TrainConfig, *, total_steps: int, world_size: int, train_data: str | None,
             tokenizer: str | None) -> dict[str, Any]:
    """The settings that decide what a run trains, as JSON values (`train_data`, `tokenizer`:
    fingerprints, None where unknown)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name not in FREE_ON_RESUME:
            values[f.name] = getattr(config, f.name)
    # What each method does not use cannot make two runs differ
    values["epsilon"], values["epsilon_check"] = config.step_epsilon, config.check_epsilon
    for name in unused_method_fields(config.method):
        values[name] = None
    if not config.moves_reference:
        values["ref_model_sync_steps"] = values["ref_model_mixup_alpha"] = None
    values["max_steps"] = total_steps if config.lr_scheduler_type in TOTAL_DEPENDENT_SCHEDULES else None
    # transformers' constant schedule has no warm-up, whatever warmup_steps says
    values["warmup_steps"] = None if config.lr_scheduler_type == "constant" else config.warmup_steps_for(total_steps)
    values.update(world_size=world_size, train_data=train_data, tokenizer=tokenizer)
    return json.loads(json.dumps(values))


def saved_identity(trainer_state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any] | None:
    """The identity a checkpoint recorded; for a checkpoint from before identities were recorded,
    the one its training_config.json gives without fingerprints (None when that config is no longer
    a valid TrainConfig)."""
    if isinstance(trainer_state.get("run_identity"), dict):
        return trainer_state["run_identity"]
    from epsdpo.config import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        saved = TrainConfig.from_dict({k: v for k, v in config.items() if k in known})
        return identity(saved, total_steps=int(trainer_state.get("max_steps", 0)),
                        world_size=int(trainer_state.get("world_size", 1)), train_data=None, tokenizer=None)
    except (ValueError, TypeError):
        return None


def differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key → (checkpoint's value, this run's value) for each key that differs. A key the checkpoint
    did not record (a field added since) counts as its default; an unknown fingerprint as equal."""
    from epsdpo.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    found = {}
    for key, value in current.items():
        old = saved.get(key, defaults.get(key))
        if key in ("train_data", "tokenizer") and (old is None or value is None):
            continue
        if old != value:
            found[key] = (old, value)
    return found


def allowed(config: TrainConfig) -> set[str]:
    """The identity keys `resume_allow_changes` lets change."""
    return {ALIASES.get(name, name) for name in (config.resume_allow_changes or [])}


def describe(key: str, old: Any, new: Any) -> str:
    meaning = f" ({DERIVED[key]})" if key in DERIVED else ""
    if key in ("train_data", "tokenizer"):
        return f"{key}{meaning}: {str(old)[:12]} → {str(new)[:12]}"
    return f"{key}{meaning}: {old!r} → {new!r}"


def refusal(path: Any, diffs: dict[str, tuple[Any, Any]], allow: set[str]) -> str:
    """One message: every difference, and for each what would let the run go on."""
    listed = "; ".join(describe(k, *v) for k, v in diffs.items())
    changeable = [k for k in diffs if k in CHANGEABLE_ON_RESUME and k not in allow]
    fixed = [k for k in diffs if k not in CHANGEABLE_ON_RESUME]
    text = f"{path} was written by a run with other settings than this one ({listed})"
    if changeable:
        text += (f"; to train with this run's {', '.join(changeable)} from the checkpoint's step on, list "
                 f"{'it' if len(changeable) == 1 else 'them'} in resume_allow_changes")
    if diffs.get("ref_model_sync_steps", (0,))[0] is None:
        text += ("; the checkpoint's run kept its reference fixed, so it holds no moved reference "
                 "(reference.safetensors) for this run's TR-DPO update to continue from")
    if fixed:
        text += (f"; {', '.join(fixed)} cannot change on resume (the checkpoint's β state, data order, optimizer "
                 "and reference belong to its values): resume with the checkpoint's settings "
                 f"(its training_config.json), or start a new run from its weights (model: {path})")
    return text


def store_fingerprint(store: Any) -> str:
    """Hash of the tokenized pairs: every pair's id and prompt, chosen and rejected tokens, in order
    (about 2.5 µs a pair)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(len(store)).encode())
    h.update(store.ids().tobytes())
    for index in range(len(store)):
        for part in store[index]:
            h.update(len(part).to_bytes(4, "little"))
            h.update(part.tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """Hash of the tokenizer's definition (a fast tokenizer's full serialization, else its
    vocabulary), special tokens and chat template; None without a tokenizer (a pre-tokenized store)."""
    if tokenizer is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from epsdpo.data.cache import tokenizer_hash

        h.update(tokenizer_hash(tokenizer).encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    else:
        h.update(type(tokenizer).__qualname__.encode())
    special = getattr(tokenizer, "special_tokens_map", {})
    h.update(json.dumps([special, getattr(tokenizer, "chat_template", None)], sort_keys=True, default=str).encode())
    return h.hexdigest()
