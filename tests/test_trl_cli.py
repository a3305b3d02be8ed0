"""A TRL user's commands run with only the program name changed: `epsdpo train --config`, flags-only
runs, every `--no_<bool>`, every key of TRL 1.16's DPOConfig / ModelConfig / ScriptArguments /
DatasetMixtureConfig (a setting here, or refused with its reason, or accepted without effect and
said so), and the TRL keys epsdpo implements (optim, lr_scheduler_kwargs, logging_first_step, ...)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import yaml

from epsdpo import trl_keys
from epsdpo.cli import RUN_KEYS, main
from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from recording_trainer import RecordingTrainer
from test_config_cli import usage_error
from test_trl_config import model_and_data
from tiny import tiny_llama, toy_store

trl = pytest.importorskip("trl")

TRL_CLASSES = (trl.DPOConfig, trl.ModelConfig, trl.ScriptArguments, trl.DatasetMixtureConfig)
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def trl_defaults() -> dict[str, object]:
    """Every key TRL's `trl dpo` parser reads from a YAML, with TRL's default."""
    out = {}
    for cls in TRL_CLASSES:
        for f in dataclasses.fields(cls):
            if f.init:
                out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ndataset_name: pairs.jsonl\n")
    return path


def run(*argv):
    assert main(["train", *map(str, argv)]) == 0
    return RecordingTrainer.calls[-1]


# ------------------------------------------------------------------------- every TRL key
def test_every_trl_key_is_a_setting_or_refused_or_without_effect():
    ours = FIELDS | set(RUN_KEYS) | {"resume_from_checkpoint"}  # the command's resume, as TRL's scripts read it
    assert [k for k in trl_defaults() if k not in ours and k not in trl_keys.KEYS] == []
    # a key is one of the three, never a setting and refused at once
    assert sorted(set(trl_keys.KEYS) & ours) == []
    assert not set(trl_keys.REFUSED) & set(trl_keys.WITHOUT_EFFECT)


def test_the_table_holds_trls_defaults():
    defaults = trl_defaults()
    assert {k: trl_keys.trl_default(k) for k in trl_keys.KEYS if k in defaults} == \
        {k: defaults[k] for k in trl_keys.KEYS if k in defaults}
    # the rest are the keys TRL's own command reads: `trl dpo` hands them to accelerate launch
    assert sorted(k for k in trl_keys.KEYS if k not in defaults) == ["accelerate_config", "num_processes"]


def test_trl_keys_at_trls_defaults_train_and_say_nothing(trainer, tmp_path, capsys):
    values = {k: trl_keys.trl_default(k) for k in trl_keys.KEYS}
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset_name": "d", **values}))
    assert run(path)["model"] == "m"
    assert capsys.readouterr().err == ""


def away_from(default):
    """A value other than TRL's default, of its kind."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 3
    if isinstance(default, list):
        return ["x"]
    return "x" if default is None else f"{default}-x"


@pytest.mark.parametrize("key", sorted(trl_keys.REFUSED))
def test_a_refused_trl_key_is_a_usage_error_with_its_reason(capsys, tmp_path, key):
    value = away_from(trl_keys.trl_default(key))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "train_data": "d", key: value}))
    line = usage_error(capsys, "train", str(path))
    assert f"{key}=" in line and trl_keys.REFUSED[key].reason in line, line


@pytest.mark.parametrize(("argv", "line"), [
    (["--use_liger_kernel"], "argument --use_liger_kernel: use_liger_kernel=True is invalid: epsdpo's fused log-prob "
                             "kernel is built in"),
    (["--torch_compile", "true"], "argument --torch_compile: torch_compile=True is invalid: torch.compile"),
    (["--no_average_tokens_across_devices"], "average_tokens_across_devices=False is invalid: the loss is averaged"),
    (["--deepspeed", "ds.json"], "argument --deepspeed: deepspeed='ds.json' is invalid: DeepSpeed is not supported; "
                                 "set fsdp: true"),
    (["--num_processes", "4"], "num_processes=4 is invalid: launch the processes with torchrun --nproc_per_node"),
])
def test_a_refused_trl_flag_is_a_usage_error_naming_it(capsys, cfg, argv, line):
    assert line in usage_error(capsys, "train", str(cfg), *argv)


def test_a_key_without_effect_trains_and_is_said_once(trainer, cfg, capsys):
    run(cfg, "--dataloader_num_workers", "4", "--hub_token", "hf_secret", "--hub_model_id", "me/model")
    err = capsys.readouterr().err
    assert sorted(err.splitlines()) == [f"epsdpo train: dataloader_num_workers has no effect: {trl_keys.NO_WORKERS}",
                                        f"epsdpo train: hub_model_id has no effect: {trl_keys.NO_UPLOAD}",
                                        f"epsdpo train: hub_token has no effect: {trl_keys.NO_UPLOAD}"]
    assert "hf_secret" not in err  # a token is never written back


def test_every_no_flag_of_trls_parser_parses(trainer, cfg, capsys):
    """TRL's `--no_<bool>` flags (a boolean whose default is true) each set the key false here, or
    are refused with the reason; none is an unknown argument."""
    from trl.scripts.dpo import make_parser

    flags = sorted({s for a in make_parser()._actions for s in a.option_strings if s.startswith("--no_")})
    assert "--no_gradient_checkpointing" in flags and len(flags) > 5
    for flag in flags:
        key = flag.removeprefix("--no_")
        try:
            config = run(cfg, flag)["config"]
        except SystemExit:
            err = capsys.readouterr().err
            assert f"{key}=False is invalid: " in err and "unrecognized" not in err, err
            continue
        if key in FIELDS:
            assert getattr(config, key) is False, flag


def test_no_flags_for_epsdpos_own_booleans(trainer, cfg):
    assert run(cfg, "--gradient_checkpointing", "--no_gradient_checkpointing")["config"].gradient_checkpointing is False
    assert run(cfg, "--no-bf16")["config"].bf16 is False


# --------------------------------------------------------------------- the command's forms
def test_config_flag_is_the_positional_yaml(trainer, cfg):
    assert run("--config", cfg, "--learning_rate", "3e-6")["config"] == run(cfg, "--learning_rate", "3e-6")["config"]
    assert RecordingTrainer.calls[-1]["model"] == "m"


def test_the_yaml_given_twice_is_a_usage_error(capsys, cfg):
    assert "the YAML is given twice" in usage_error(capsys, "train", str(cfg), "--config", str(cfg))


def test_a_flags_only_run_as_trls_dpo_script_docstring(trainer):
    """The command of TRL's trl/scripts/dpo.py docstring, program and hub ids aside: no YAML."""
    call = run("--dataset_name", "pairs.jsonl", "--model_name_or_path", "model", "--learning_rate", "5.0e-6",
               "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--max_steps", "1000",
               "--gradient_accumulation_steps", "8", "--eval_strategy", "no", "--output_dir", "Qwen2-0.5B-DPO",
               "--no_remove_unused_columns", "--use_peft", "--lora_r", "32", "--lora_alpha", "16")
    config = call["config"]
    assert (call["model"], call["train_dataset"]) == ("model", "pairs.jsonl")
    assert (config.learning_rate, config.max_steps, config.gradient_accumulation_steps, config.output_dir) == \
        (5e-6, 1000, 8, "Qwen2-0.5B-DPO")
    assert (config.remove_unused_columns, config.use_peft, config.lora_r, config.lora_alpha) == (False, True, 32, 16)


def test_env_sets_environment_variables_as_trls_parser(trainer, tmp_path, monkeypatch):
    monkeypatch.setenv("EPSDPO_TEST_VAR", "before")  # restored after the test
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain_data: d\nenv:\n  EPSDPO_TEST_VAR: 7\n")
    run(path)
    assert os.environ["EPSDPO_TEST_VAR"] == "7"


def test_resume_from_checkpoint_as_a_yaml_key(trainer, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain_data: d\nresume_from_checkpoint: out/checkpoint-4\n")
    assert run(path)["resume"] == "out/checkpoint-4"
    assert run(path, "--resume_from_checkpoint", "out/checkpoint-8")["resume"] == "out/checkpoint-8"  # the flag wins
    assert run(path, "--resume")["resume"] is True
    path.write_text("model: m\ntrain_data: d\nresume_from_checkpoint: true\n")
    assert run(path)["resume"] is True
    path.write_text("model: m\ntrain_data: d\nresume_from_checkpoint: 3\n")
    assert "resume_from_checkpoint=3 is invalid" in usage_error(capsys, "train", str(path))


@pytest.mark.slow
def test_trls_cli_docs_dpo_yaml_runs_with_only_the_program_name_changed(tmp_path, monkeypatch):
    """TRL's CLI docs: `trl dpo --config dpo_config.yaml` with a YAML of the model and the dataset,
    here a local model folder and a local file in place of the hub ids."""
    model, data = model_and_data(tmp_path)
    (tmp_path / "dpo_config.yaml").write_text(f"model_name_or_path: {model}\ndataset_name: {data}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "dpo_config.yaml"]) == 0
    out = tmp_path / TrainConfig().output_dir
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train_runtime" not in r]  # not the run's closing summary
    assert steps == [3]  # 8 pairs, 8 per batch, TRL's 3 epochs: logged at the last step
    assert (out / "final" / "model.safetensors").is_file()


# ------------------------------------------------------------------- keys implemented here
def tiny_config(out, **overrides) -> TrainConfig:
    base = dict(output_dir=str(out), max_steps=2, max_length=32, progress=False, plots=False,
                per_device_train_batch_size=4, logging_steps=10)
    return TrainConfig(**{**base, **overrides})


def test_optim_adamw_torch_fused_is_torchs_fused_adamw_with_the_same_update(tmp_path):
    trained = {}
    for optim in ("adamw_torch", "adamw_torch_fused"):
        t = Trainer(tiny_llama(0), tiny_config(tmp_path / optim, optim=optim, adam_epsilon=1e-6, report_to="none"),
                    toy_store())
        assert (t.optimizer.defaults["fused"], t.optimizer.defaults["eps"]) == (optim.endswith("fused") or None, 1e-6)
        t.train()
        trained[optim] = t.model.state_dict()
    for name, value in trained["adamw_torch"].items():
        torch.testing.assert_close(trained["adamw_torch_fused"][name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("optim", ["sgd", "adafactor", "adamw_8bit"])
def test_other_optimizers_are_refused_by_name(optim):
    with pytest.raises(ValueError, match=rf"^optim='{optim}' is invalid: must be adamw_torch or adamw_torch_fused"):
        TrainConfig(optim=optim)


def test_cosine_with_min_lr_decays_to_its_floor(tmp_path):
    for kwargs, floor in (({"min_lr_rate": 0.1}, 1e-4), ({"min_lr": 3e-4}, 3e-4)):
        t = Trainer(tiny_llama(0), tiny_config(tmp_path, learning_rate=1e-3, lr_scheduler_type="cosine_with_min_lr",
                                               lr_scheduler_kwargs=json.dumps(kwargs), report_to="none"), toy_store())
        lrs = []
        for _ in range(t.state.max_steps):
            lrs.append(t.scheduler.get_last_lr()[0])
            t.optimizer.step()
            t.scheduler.step()
        assert lrs[0] == pytest.approx(1e-3) and t.scheduler.get_last_lr()[0] == pytest.approx(floor)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(lr_scheduler_type="cosine_with_min_lr"), "must be a mapping with min_lr or min_lr_rate"),
    (dict(lr_scheduler_type="cosine", lr_scheduler_kwargs={"min_lr": 1e-7}),
     "arguments lr_scheduler_type=cosine takes \\(num_cycles\\); min_lr is not one"),
    (dict(lr_scheduler_kwargs="{not json"), "must be a JSON object"),
])
def test_scheduler_kwargs_are_checked_against_the_schedule(settings, message):
    with pytest.raises(ValueError, match=rf"^lr_scheduler_kwargs=.* is invalid: .*{message}"):
        TrainConfig(**settings)


@pytest.mark.parametrize(("first", "logged"), [(True, [1, 2]), (False, [2])])
def test_logging_first_step_logs_step_one(tmp_path, first, logged):
    Trainer(tiny_llama(0), tiny_config(tmp_path, logging_first_step=first), toy_store()).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_runtime" not in r] == logged  # not the run's closing summary


def test_a_trl_yaml_relying_on_trls_gradient_checkpointing_default_is_told(capsys, cfg):
    """TRL turns gradient checkpointing on by default, epsdpo does not: kwargs for it with it off would
    change nothing, so they are refused naming both settings."""
    cfg.write_text(cfg.read_text() + "gradient_checkpointing_kwargs: {use_reentrant: false}\n")
    line = usage_error(capsys, "train", str(cfg))
    assert "gradient_checkpointing_kwargs={'use_reentrant': False} is invalid: must be unset unless " \
           "gradient_checkpointing is true (epsdpo's default is false, TRL's true)" in line


def test_greater_is_better_needs_the_metric_it_orders():
    with pytest.raises(ValueError, match=r"^greater_is_better=True is invalid: must be unset unless "
                                         r"metric_for_best_model names the metric it orders"):
        TrainConfig(greater_is_better=True)
    assert TrainConfig(greater_is_better=True, metric_for_best_model="loss").greater_is_better_resolved()


def test_gradient_checkpointing_kwargs_reach_the_model(tmp_path, monkeypatch):
    seen = []
    model = tiny_llama(0)
    enable = model.gradient_checkpointing_enable
    monkeypatch.setattr(model, "gradient_checkpointing_enable",
                        lambda gradient_checkpointing_kwargs=None: seen.append(gradient_checkpointing_kwargs)
                        or enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs))
    Trainer(model, tiny_config(tmp_path, gradient_checkpointing=True,
                               gradient_checkpointing_kwargs='{"use_reentrant": false, "preserve_rng_state": false}'),
            toy_store())
    assert seen == [{"use_reentrant": False, "preserve_rng_state": False}]


def test_tf32_true_is_refused_without_a_gpu_that_has_it_and_false_turns_it_off(tmp_path):
    with pytest.raises(ValueError, match=r"^tf32=True is invalid: must be False or None on cpu"):
        Trainer(tiny_llama(0), tiny_config(tmp_path, tf32=True, device="cpu"), toy_store())
    before = torch.backends.fp32_precision
    try:
        torch.backends.fp32_precision = "tf32"
        Trainer(tiny_llama(0), tiny_config(tmp_path, tf32=False, device="cpu"), toy_store())
        assert torch.backends.fp32_precision == "ieee"
    finally:
        torch.backends.fp32_precision = before


def test_torch_dtype_is_dtype(tmp_path):
    assert TrainConfig(torch_dtype="bfloat16", use_peft=True).dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"^torch_dtype='float32' is invalid: must be unset or equal to dtype"):
        TrainConfig(torch_dtype="float32", dtype="bfloat16")


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_dtype_auto_is_refused_with_the_reason(key):
    with pytest.raises(ValueError, match=rf"^{key}='auto' is invalid: .*auto would load the checkpoint's own "
                                         "precision, often bfloat16, and trained weights must be float32"):
        TrainConfig(**{key: "auto"})


def test_save_only_model_checkpoints_hold_the_model_alone_and_refuse_a_resume(tmp_path):
    from transformers import AutoModelForCausalLM

    from epsdpo.checkpoint import CheckpointError

    Trainer(tiny_llama(0), tiny_config(tmp_path, save_only_model=True, save_steps=1, report_to="none"),
            toy_store()).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    assert not [f for f in ("training_state.pt", "kl_controller.bin", "sampler.bin") if (checkpoint / f).exists()]
    AutoModelForCausalLM.from_pretrained(checkpoint)  # a model folder
    resumed = Trainer(tiny_llama(0), tiny_config(tmp_path, max_steps=3, report_to="none"), toy_store())
    with pytest.raises(CheckpointError, match=r"checkpoint-2 was written with save_only_model=True: it holds the "
                                              r"model alone"):
        resumed.train(resume_from_checkpoint=True)


def test_trls_other_names_of_settings(trainer, cfg, capsys):
    assert run(cfg, "--use_cpu")["config"].device == "cpu"
    assert run(cfg, "--disable_tqdm", "true")["config"].progress is False
    assert run(cfg, "--use_cpu", "false", "--disable_tqdm", "false")["config"].progress is True
    assert "use_cpu=True is invalid: must be false with device='cuda:1'" in usage_error(
        capsys, "train", str(cfg), "--use_cpu", "--device", "cuda:1")
