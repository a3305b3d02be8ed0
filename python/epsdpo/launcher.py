"""What `accelerate launch` asks of a run, honoured or refused.

`accelerate launch --config_file fsdp2.yaml` does not pass its settings as arguments: it starts each
process with environment variables (accelerate/utils/launch.py, `prepare_multi_gpu_env` and
`prepare_simple_launcher_cmd_env`). A script that does not read them runs without what the launcher
was configured for (TRL's fsdp2.yaml would train with plain DDP in float32). The trainer reads them
here, where the config meets the environment:

- honoured: `ACCELERATE_USE_FSDP` with `FSDP_VERSION=2` sets `fsdp`; `ACCELERATE_MIXED_PRECISION`
  bf16 / fp16 sets `bf16` / `fp16`; `ACCELERATE_USE_CPU` true sets `device=cpu`. `no` (accelerate's
  default when a launcher config names none) asks for nothing, so the config's precision stands.
- refused, with the reason: DeepSpeed, Megatron-LM, accelerate's parallelism config (tensor / context
  parallelism), FSDP1, FSDP CPU offload, FSDP activation checkpointing (set gradient_checkpointing),
  FSDP without resharding after forward, a wrap policy other than per transformer block, fp8, and
  torch.compile (a dynamo backend).
- a launcher setting that contradicts the config (fp16 in one, bf16 in the other; another device) is
  an error naming both.

The other FSDP variables describe what epsdpo's FSDP2 does anyway (full sharding, each transformer
block one unit, states gathered for saving) or only how accelerate itself loads a model
(`FSDP_CPU_RAM_EFFICIENT_LOADING`, `FSDP_SYNC_MODULE_STATES`, `FSDP_STATE_DICT_TYPE`: epsdpo writes
sharded checkpoints and a gathered final/ whatever it says), and are not read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from epsdpo.config import TrainConfig


class LauncherSettingError(ValueError):
    """The launcher asks for something epsdpo does not do, or for the opposite of the config."""


def _true(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "y", "t", "on")


def _refusals(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable=value, why) for every launcher setting epsdpo does not support."""
    found = []
    for name, why in (
        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed (ZeRO) is not supported; to shard, launch an FSDP2 config "
                                     "(fsdp_version: 2) or torchrun with fsdp: true"),
        ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM is not supported"),
        ("ACCELERATE_USE_PARALLELISM_CONFIG", "tensor / context / sequence parallelism is not supported; FSDP2 "
                                              "(fsdp: true) and DDP are"),
    ):
        if _true(env, name):
            found.append((f"{name}={env[name]}", why))
    if _true(env, "ACCELERATE_USE_FSDP"):
        version = env.get("FSDP_VERSION", "1").strip()
        if version != "2":
            found.append((f"FSDP_VERSION={version}", "only FSDP2 is supported; set fsdp_version: 2 in the "
                                                     "accelerate config (or fsdp: true under torchrun)"))
        if _true(env, "FSDP_OFFLOAD_PARAMS"):
            found.append(("FSDP_OFFLOAD_PARAMS=true", "CPU offload of parameters is not supported"))
        for name in ("FSDP_ACTIVATION_CHECKPOINTING", "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD"):
            if _true(env, name):
                found.append((f"{name}=true", "set gradient_checkpointing: true in the training config instead"))
        if env.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() in ("false", "0", "no"):
            found.append(("FSDP_RESHARD_AFTER_FORWARD=false", "epsdpo's FSDP2 reshards each block after its "
                                                              "forward; leave fsdp_reshard_after_forward true"))
        policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip()
        if policy != "TRANSFORMER_BASED_WRAP":
            found.append((f"FSDP_AUTO_WRAP_POLICY={policy}", "epsdpo's FSDP2 makes each transformer block one "
                                                             "unit (TRANSFORMER_BASED_WRAP)"))
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if precision not in ("no", "bf16", "fp16", ""):
        found.append((f"ACCELERATE_MIXED_PRECISION={precision}", "only bf16 and fp16 mixed precision are supported"))
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "NO").strip().upper()
    if dynamo not in ("NO", ""):
        found.append((f"ACCELERATE_DYNAMO_BACKEND={dynamo}", "torch.compile is not supported; set dynamo_backend: "
                                                             "'no'"))
    return found


def apply_launcher_settings(config: TrainConfig, env: Mapping[str, str]) -> TrainConfig:
    """`config` with what the launcher's environment asks for, or the same config when it asks for
    nothing; raises LauncherSettingError naming the variable for what is refused or contradicts the
    config."""
    refused = _refusals(env)
    if refused:
        setting, why = refused[0]
        more = f" (also refused: {', '.join(other for other, _ in refused[1:])})" if len(refused) > 1 else ""
        raise LauncherSettingError(f"the launcher (accelerate) sets {setting}: {why}{more}")
    changes: dict[str, object] = {}
    if _true(env, "ACCELERATE_USE_FSDP") and not config.fsdp:
        changes["fsdp"] = True
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if precision in ("bf16", "fp16"):
        other = "fp16" if precision == "bf16" else "bf16"
        if getattr(config, other):
            raise LauncherSettingError(f"the launcher (accelerate) sets ACCELERATE_MIXED_PRECISION={precision} and the "
                                       f"config sets {other}=True: choose one compute precision")
        if not getattr(config, precision):
            changes[precision] = True
    if _true(env, "ACCELERATE_USE_CPU"):
        if config.device is not None and not config.device.startswith("cpu"):
            raise LauncherSettingError(f"the launcher (accelerate) sets ACCELERATE_USE_CPU=true and the config sets "
                                       f"device={config.device!r}: choose one")
        if config.device is None:
            changes["device"] = "cpu"
    return dataclasses.replace(config, **changes) if changes else config
