"""`accelerate launch` passes its config to each process as environment variables: what epsdpo
supports (FSDP2, bf16/fp16) is honoured and recorded, anything else is refused in one line naming the
variable, and a launcher that contradicts the config is an error (epsdpo.launcher)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import epsdpo
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
                                                   r"supported; set fsdp_version: 2 in the accelerate config "
                                                   r"\(or fsdp: true under torchrun\)$"):
        apply_launcher_settings(config(), env)


FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.mark.parametrize(("env", "named"), [
    pytest.param({"ACCELERATE_USE_DEEPSPEED": "true"},
                 "ACCELERATE_USE_DEEPSPEED=true: DeepSpeed \\(ZeRO\\) is not supported", id="deepspeed"),
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
                 "ACCELERATE_USE_DEEPSPEED=true: DeepSpeed \\(ZeRO\\) is not supported; .* \\(also refused: "
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
                                         r"DeepSpeed \(ZeRO\) is not supported; to shard, launch an FSDP2 config"):
        main(["train", str(tmp_path / "c.yaml")])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- TRL's shipped accelerate configs
def trl_accelerate_config(name: str) -> Path:
    trl = pytest.importorskip("trl")
    return Path(trl.__file__).parent / "accelerate_configs" / f"{name}.yaml"


def shipped_env(name: str) -> dict[str, str]:
    """The variables `accelerate launch --config_file <TRL's NAME.yaml>` gives each process, by the
    launcher accelerate picks for it (accelerate/commands/launch.py, launch_command)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    path = trl_accelerate_config(name)
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path),
                                                                                    "train.py"]))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    else:
        env = prepare_simple_launcher_cmd_env(args)[1]
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


@pytest.mark.parametrize(("name", "honoured"), [
    ("multi_gpu", dict(bf16=True, fsdp=False)),
    ("single_gpu", dict(bf16=True, fsdp=False)),
    ("fsdp2", dict(bf16=True, fsdp=True)),
])
def test_trls_shipped_configs_are_honoured(name, honoured):
    settings = apply_launcher_settings(config(), shipped_env(name))
    assert {k: getattr(settings, k) for k in honoured} == honoured


@pytest.mark.parametrize(("name", "setting"), [
    ("zero1", "ACCELERATE_USE_DEEPSPEED=true"), ("zero2", "ACCELERATE_USE_DEEPSPEED=true"),
    ("zero3", "ACCELERATE_USE_DEEPSPEED=true"), ("fsdp1", "FSDP_VERSION=1"),
])
def test_trls_shipped_zero_and_fsdp1_configs_are_refused_pointing_to_fsdp(name, setting):
    with pytest.raises(LauncherSettingError) as refused:
        apply_launcher_settings(config(), shipped_env(name))
    line = str(refused.value)
    assert line.startswith(f"the launcher (accelerate) sets {setting}: ") and "fsdp" in line and "\n" not in line


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_launched(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a launcher to its end in a session of its own (on a hang every process it started is
    killed, and the test fails instead of holding the suite), on gloo CPU ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(Path(epsdpo.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output = process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{' '.join(command)}: no end within {timeout:g} s")
    return subprocess.CompletedProcess(command, process.returncode, output)


def launch_run_yaml(tmp_path: Path, **keys) -> Path:
    from test_trl_config import model_and_data

    model, data = model_and_data(tmp_path)
    text = {"model_name_or_path": str(model), "dataset_name": str(data), "output_dir": str(tmp_path / "out"),
            "max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64, "logging_steps": 1, "save_steps": 1,
            "lr_scheduler_type": "constant", "progress": False, "plots": False, **keys}
    path = tmp_path / "run.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in text.items()))
    return path


@pytest.mark.slow
def test_accelerate_launch_with_trls_multi_gpu_config_trains_on_two_cpu_ranks(tmp_path):
    """`accelerate launch --config_file <TRL's multi_gpu.yaml> --num_processes 2 -m epsdpo train`:
    two gloo ranks, with the config's bf16 honoured and recorded."""
    cfg = launch_run_yaml(tmp_path)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    done = run_launched([*accelerate, "--config_file", str(trl_accelerate_config("multi_gpu")), "--num_processes", "2",
                         "--main_process_port", str(free_port()), "-m", "epsdpo", "train", str(cfg)], tmp_path,
                        timeout=240)
    assert done.returncode == 0, done.stdout[-3000:]
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert json.loads((checkpoint / "epsdpo_state.json").read_text())["world_size"] == 2
    assert json.loads((checkpoint / "training_config.json").read_text())["bf16"] is True  # multi_gpu.yaml's bf16


# ------------------------------------------------------------------------------ multi-node
def run_nodes(commands: list[list[str]], cwd: Path, timeout: float) -> list[subprocess.CompletedProcess]:
    """Start every node's launcher at once, each in a session of its own, and wait for all; on a hang
    every node's processes are killed and the test fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(Path(epsdpo.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    nodes = [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c in commands]
    deadline, done = time.monotonic() + timeout, []
    try:
        for node, command in zip(nodes, commands):
            output = node.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
            done.append(subprocess.CompletedProcess(command, node.returncode, output))
    except subprocess.TimeoutExpired:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
            node.communicate()
        pytest.fail(f"the nodes did not end within {timeout:g} s")
    return done


def two_nodes(cfg: Path, *flags: str) -> list[list[str]]:
    """`torchrun --nnodes 2` once per node, as on two machines: one process each, meeting at a c10d
    rendezvous (here on localhost; on a cluster, the first node's address)."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"epsdpo-{os.getpid()}-{free_port()}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", run_id]
    return [[*torchrun, "-m", "epsdpo", "train", str(cfg), *flags] for _ in range(2)]


@pytest.mark.slow
def test_two_nodes_train_and_resume_with_torchrun_nnodes_2(tmp_path):
    """Two simulated nodes (two torchrun agents, c10d rendezvous on localhost, gloo) train a run to
    step 2, then resume it from its checkpoint and train on to step 3."""
    cfg = launch_run_yaml(tmp_path)
    for node in run_nodes(two_nodes(cfg), tmp_path, timeout=240):
        assert node.returncode == 0, node.stdout[-3000:]
    out = tmp_path / "out"
    assert json.loads((out / "checkpoint-2" / "epsdpo_state.json").read_text())["world_size"] == 2
    for node in run_nodes(two_nodes(cfg, "--max_steps", "3", "--resume"), tmp_path, timeout=240):
        assert node.returncode == 0, node.stdout[-3000:]
    state = json.loads((out / "checkpoint-3" / "epsdpo_state.json").read_text())
    assert (state["global_step"], state["world_size"]) == (3, 2)
    assert [(r["step"], r["checkpoint"]) for r in state["resumes"]] == [(2, "checkpoint-2")]
