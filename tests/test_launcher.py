"""`accelerate launch` passes its config to each process as environment variables: what epsdpo
supports (FSDP2, bf16/fp16) is honoured and recorded, anything else is refused in one line naming the
variable, and a launcher that contradicts the config is an error (epsdpo.launcher)."""

from __future__ import annotations

import json

import pytest

from epsdpo.config import TrainConfig
from epsdpo.launcher import LauncherSettingError, apply_launcher_settings
from epsdpo.trainer import Trainer
from tiny import tiny_llama, toy_store

# TRL's trl/accelerate_configs/fsdp2.yaml (TRL 1.16), as shipped
TRL_FSDP2 = """\
compute_environment: LOCAL_MACHINE
debug: false
distributed_type: FSDP
downcast_bf16: 'no'
enable_cpu_affinity: false
fsdp_config:
  fsdp_activation_checkpointing: false
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: true
  fsdp_offload_params: false
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_version: 2
machine_rank: 0
main_training_function: main
mixed_precision: bf16
num_machines: 1
num_processes: 8
rdzv_backend: static
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: false
"""


def accelerate_env(tmp_path, yaml_text: str) -> dict[str, str]:
    """The variables `accelerate launch --config_file` sets for its processes, from accelerate's own
    launch code (no process is started)."""
    import os

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = tmp_path / "launcher.yaml"
    path.write_text(yaml_text)
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "train.py"]))
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


def config(out=None, **overrides) -> TrainConfig:
    base = dict(output_dir=str(out or "unused"), max_steps=1, max_length=32, progress=False, plots=False,
                report_to="none", per_device_train_batch_size=4, save_steps=1)
    return TrainConfig(**{**base, **overrides})


def test_trls_fsdp2_config_trains_with_fsdp_and_bf16_and_records_them(tmp_path, monkeypatch):
    env = accelerate_env(tmp_path, TRL_FSDP2)
    assert (env["ACCELERATE_USE_FSDP"], env["FSDP_VERSION"], env["ACCELERATE_MIXED_PRECISION"]) == ("true", "2", "bf16")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    trainer = Trainer(tiny_llama(0), config(tmp_path / "run"), toy_store())
    assert trainer.config.fsdp and trainer.config.bf16 and trainer.precision.dtype is not None
    trainer.train()
    recorded = json.loads((tmp_path / "run" / "checkpoint-1" / "training_config.json").read_text())
    assert (recorded["fsdp"], recorded["bf16"], recorded["fp16"]) == (True, True, False)


def test_trls_fsdp1_config_is_refused(tmp_path):
    env = accelerate_env(tmp_path, TRL_FSDP2.replace("fsdp_version: 2", "fsdp_version: 1"))
    with pytest.raises(LauncherSettingError, match=r"^the launcher \(accelerate\) sets FSDP_VERSION=1: only FSDP2 is "
                                                   r"supported; set fsdp_version: 2 in the accelerate config$"):
        apply_launcher_settings(config(), env)


FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.mark.parametrize(("env", "named"), [
    pytest.param({"ACCELERATE_USE_DEEPSPEED": "true"}, "ACCELERATE_USE_DEEPSPEED=true: DeepSpeed is not supported",
                 id="deepspeed"),
    pytest.param({"ACCELERATE_USE_MEGATRON_LM": "true"}, "ACCELERATE_USE_MEGATRON_LM=true: Megatron-LM", id="megatron"),
    pytest.param({"ACCELERATE_USE_PARALLELISM_CONFIG": "true"}, "ACCELERATE_USE_PARALLELISM_CONFIG=true: tensor",
                 id="tensor-parallel"),
    pytest.param({"ACCELERATE_USE_FSDP": "true"}, "FSDP_VERSION=1: only FSDP2", id="fsdp-without-version-is-fsdp1"),
    pytest.param({**FSDP2, "FSDP_OFFLOAD_PARAMS": "true"}, "FSDP_OFFLOAD_PARAMS=true: CPU offload", id="offload"),
    pytest.param({**FSDP2, "FSDP_ACTIVATION_CHECKPOINTING": "true"},
                 "FSDP_ACTIVATION_CHECKPOINTING=true: set gradient_checkpointing: true", id="activation-checkpointing"),
    pytest.param({**FSDP2, "FSDP_RESHARD_AFTER_FORWARD": "false"}, "FSDP_RESHARD_AFTER_FORWARD=false", id="no-reshard"),
    pytest.param({**FSDP2, "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "FSDP_AUTO_WRAP_POLICY=SIZE_BASED_WRAP",
                 id="size-based-wrap"),
    pytest.param({"ACCELERATE_MIXED_PRECISION": "fp8"}, "ACCELERATE_MIXED_PRECISION=fp8: only bf16 and fp16", id="fp8"),
    pytest.param({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, "ACCELERATE_DYNAMO_BACKEND=INDUCTOR: torch.compile",
                 id="torch-compile"),
    pytest.param({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "fp8"},
                 "ACCELERATE_USE_DEEPSPEED=true: DeepSpeed is not supported; .* \\(also refused: "
                 "ACCELERATE_MIXED_PRECISION=fp8\\)$", id="two-at-once"),
])
def test_an_unsupported_launcher_setting_is_refused_naming_it(env, named):
    with pytest.raises(LauncherSettingError, match=rf"^the launcher \(accelerate\) sets {named}"):
        apply_launcher_settings(config(), env)


@pytest.mark.parametrize(("env", "settings", "named"), [
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, dict(fp16=True), "ACCELERATE_MIXED_PRECISION=bf16 and the config sets fp16"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, dict(bf16=True), "ACCELERATE_MIXED_PRECISION=fp16 and the config sets bf16"),
    ({"ACCELERATE_USE_CPU": "True"}, dict(device="cuda:0"), "ACCELERATE_USE_CPU=true and the config sets device='cuda:0'"),
])
def test_a_launcher_contradicting_the_config_is_an_error(env, settings, named):
    with pytest.raises(LauncherSettingError, match=rf"^the launcher \(accelerate\) sets {named}"):
        apply_launcher_settings(config(**settings), env)


@pytest.mark.parametrize(("env", "settings", "expected"), [
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, {}, dict(fp16=True, bf16=False)),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, dict(bf16=True), dict(bf16=True)),  # agrees: nothing to change
    ({"ACCELERATE_MIXED_PRECISION": "no"}, dict(bf16=True), dict(bf16=True)),  # accelerate's default asks nothing
    ({**FSDP2, "FSDP_SHARDING_STRATEGY": "FULL_SHARD", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, {}, dict(fsdp=True)),
    ({"ACCELERATE_USE_CPU": "False", "ACCELERATE_DYNAMO_BACKEND": "NO"}, {}, dict(device=None, fsdp=False)),
    ({"ACCELERATE_USE_CPU": "true"}, {}, dict(device="cpu")),
])
def test_supported_launcher_settings_are_honoured(env, settings, expected):
    honoured = apply_launcher_settings(config(**settings), env)
    assert {k: getattr(honoured, k) for k in expected} == expected


def test_no_launcher_leaves_the_config_as_given():
    given = config(bf16=True)
    assert apply_launcher_settings(given, {}) is given


def test_epsdpo_train_refuses_an_unsupported_launcher_in_one_line(tmp_path, monkeypatch):
    from epsdpo.cli import main

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    (tmp_path / "c.yaml").write_text(f"model: m\ntrain_data: d\noutput_dir: {tmp_path / 'out'}\n")
    with pytest.raises(SystemExit, match=r"^epsdpo train: the launcher \(accelerate\) sets ACCELERATE_USE_DEEPSPEED=true: "
                                         r"DeepSpeed is not supported; launch an FSDP2 config"):
        main(["train", str(tmp_path / "c.yaml")])
    assert not (tmp_path / "out").exists()
