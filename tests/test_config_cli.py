"""`epsdpo train`'s flags and YAML (HfArgumentParser over TrainConfig and RunArguments), `prepare`'s
flags and `--version`, without training: the Trainer is replaced by one that records its arguments."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import yaml

import epsdpo
import epsdpo.data
import epsdpo.models
from epsdpo.cli import RUN_KEYS, RunArguments, build_parser, main
from epsdpo.config import TrainConfig
from recording_trainer import RecordingTrainer

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]

# A valid value other than the default for every TrainConfig field (but fp16, which bf16=True excludes,
# precompute_ref_log_probs, which method="tr_dpo" excludes, and label_smoothing, loss_type and push_to_hub,
# each accepted only as TRL's default).
NON_DEFAULT = dict(
    output_dir="runs/x", method="tr_dpo", beta=0.2, beta_min=0.05, epsilon=0.05, epsilon_check=0.02, cdpo_smoothing=0.1,
    label_smoothing=0.0, loss_type="sigmoid",
    sync_ref_model=True, ref_model_sync_steps=16, ref_model_mixup_alpha=0.5, beta_dpo_alpha=0.3, beta_dpo_momentum=0.8, beta_dpo_filter=0.5,
    learning_rate=1e-5, optim="adamw_torch_fused", adam_epsilon=1e-6, per_device_train_batch_size=2, per_device_eval_batch_size=3, gradient_accumulation_steps=4,
    num_train_epochs=2.5, max_steps=7, lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycles": 1.5}, warmup_steps=3.0, warmup_ratio=0.0,
    weight_decay=0.01,
    adam_beta1=0.8, adam_beta2=0.99, max_grad_norm=0.0, max_length=None, max_prompt_length=64, max_completion_length=32,
    truncation_mode="keep_start", prompt_truncation_mode="keep_start", layout="packed", padding_free=True,
    group_by_length=True, max_tokens_per_batch=4096, pad_to_multiple_of=8, skip_invalid=True, dataset_cache_dir="cache",
    dataset_num_proc=4, seed=7, device="cpu", ddp_timeout=60, tf32=False, dtype="bfloat16", torch_dtype="bfloat16",
    bf16=True, fp16=False, model_init_kwargs={"attn_implementation": "eager"},
    trust_remote_code=True, attn_implementation="sdpa", model_revision="v1", use_peft=True, lora_r=8,
    lora_alpha=16, lora_dropout=0.1, lora_target_modules=["q_proj", "v_proj"], chat_template_path="chat.jinja",
    max_row_bytes=4096, disable_dropout=False,
    gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}, fsdp=True, chunk_size=256, precompute_ref_log_probs=False, precompute_ref_batch_size=16,
    logging_strategy="epoch", logging_steps=5, logging_first_step=True,
    eval_strategy="epoch", eval_steps=10, save_strategy="steps", save_steps=20, save_total_limit=2, save_only_model=True,
    metric_for_best_model="rewards/accuracies", greater_is_better=True, load_best_model_at_end=False,
    overwrite_output_dir=True, run_name="r1", report_to="none",
    resume_allow_changes=["learning_rate", "max_steps"],
    remove_unused_columns=False, push_to_hub=False, plots=False, progress=False,
)


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain_data: pairs.jsonl\nlearning_rate: 1e-3\nlayout: packed\n")
    return str(path)


def train(*argv):
    assert main(["train", *argv]) == 0
    return RecordingTrainer.calls[-1]


def usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: ") and len(lines) == 2, err  # usage, then one line of error
    return lines[-1]


def test_non_default_values_cover_every_field():
    assert sorted(NON_DEFAULT) == sorted(FIELDS)
    defaults = TrainConfig()
    # fp16 cannot be on with bf16=True, nor warmup_ratio with warmup_steps, nor precompute_ref_log_probs with
    # tr_dpo; label_smoothing, loss_type, truncation_mode, load_best_model_at_end and push_to_hub have one value
    assert [k for k, v in NON_DEFAULT.items() if getattr(defaults, k) == v] == [
        "label_smoothing", "loss_type", "warmup_ratio", "truncation_mode", "fp16", "precompute_ref_log_probs",
        "load_best_model_at_end", "push_to_hub"]


def test_help_lists_every_field_with_its_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping: each help text appears whole
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for f in [*dataclasses.fields(TrainConfig), *dataclasses.fields(RunArguments)]:
        assert f"--{f.name}" in out, f.name
        assert f.metadata["help"].strip() and f.metadata["help"] in out, f.name
    assert "(default: 0.01)" in out  # epsilon's default
    assert "--resume_from_checkpoint PATH" in out and "--no_plots" in out


def test_building_the_parser_leaves_the_dataclass_field_types_alone():
    before = [f.type for f in dataclasses.fields(TrainConfig)] + [f.type for f in dataclasses.fields(RunArguments)]
    build_parser()
    after = [f.type for f in dataclasses.fields(TrainConfig)] + [f.type for f in dataclasses.fields(RunArguments)]
    assert after == before


def test_yaml_values_and_defaults(trainer, cfg):
    call = train(cfg)
    assert call["model"] == "m" and call["train_dataset"] == "pairs.jsonl" and call["resume"] is None
    assert call["tokenizer"] is None and call["ref_model"] is None and call["eval_dataset"] is None
    config = call["config"]
    assert (config.learning_rate, config.layout, config.beta, config.bf16) == (1e-3, "packed", 0.1, False)


@pytest.mark.parametrize("spelling", [
    ["--learning_rate", "2e-4", "--layout", "padded", "--max_length", "64", "--max_prompt_length", "32"],
    ["--learning_rate=2e-4", "--layout=padded", "--max_length=64", "--max_prompt_length=32"],
    ["--learning-rate", "2e-4", "--layout=padded", "--max-length=64", "--max-prompt-length", "32"],
])
def test_flags_override_the_yaml_in_either_spelling(trainer, cfg, spelling):
    config = train(cfg, *spelling)["config"]
    assert (config.learning_rate, config.layout, config.max_length, config.max_prompt_length) == (
        2e-4, "padded", 64, 32)


def test_run_keys_are_flags_too(trainer, cfg):
    call = train(cfg, "--model", "other", "--train-data=t.store", "--eval_data", "e.jsonl", "--tokenizer=tok",
                 "--ref_model", "ref")
    assert (call["model"], call["train_dataset"], call["eval_dataset"], call["tokenizer"], call["ref_model"]) == (
        "other", "t.store", "e.jsonl", "tok", "ref")


@pytest.mark.parametrize("argv, bf16", [
    (["--bf16"], True), (["--bf16", "true"], True), (["--bf16=false"], False), (["--bf16", "no"], False),
    (["--bf16=1"], True),
])
def test_boolean_flags_as_in_trl(trainer, cfg, argv, bf16):
    assert train(cfg, *argv)["config"].bf16 is bf16


def test_a_bare_boolean_flag_does_not_swallow_the_config_path(trainer, cfg):
    config = train("--bf16", cfg, "--no_plots", "--progress", "false")["config"]
    assert (config.bf16, config.plots, config.progress) == (True, False, False)


def test_none_for_the_fields_that_allow_it(trainer, cfg):
    config = train(cfg, "--max_length", "none", "--max_prompt_length=None", "--dtype", "None", "--device=null",
                   "--epsilon_check", "0.2", "--save_steps", "5")["config"]
    assert (config.max_length, config.max_prompt_length, config.dtype, config.device) == (None, None, None, None)
    assert (config.epsilon_check, config.save_steps) == (0.2, 5)


def test_every_field_round_trips_through_yaml(trainer, tmp_path):
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump({**NON_DEFAULT, "model": "m", "train_data": "d", "eval_data": "e"}))
    assert train(str(path))["config"].to_dict() == NON_DEFAULT
    assert TrainConfig.from_dict(TrainConfig(**NON_DEFAULT).to_dict()) == TrainConfig(**NON_DEFAULT)


def test_every_field_round_trips_through_flags(trainer, cfg):
    def flags(key, value):
        if isinstance(value, dict):
            return [f"--{key}={json.dumps(value)}"]
        if isinstance(value, list):  # nargs: the flag, then each item
            return [f"--{key}", *value]
        return [f"--{key}={'none' if value is None else str(value).lower() if isinstance(value, bool) else value}"]

    # eval_strategy=epoch evaluates: on eval_data (without it, on train_data's test split)
    assert train(cfg, "--eval_data", "e", *(f for k, v in NON_DEFAULT.items() for f in flags(k, v)))["config"].to_dict() \
        == NON_DEFAULT


@pytest.mark.parametrize("argv, message", [
    (["--beta=abc"], "argument --beta: invalid float value: 'abc'"),
    (["--max_steps", "2.5"], "argument --max_steps/--max-steps: invalid int value: '2.5'"),
    (["--bf16=nope"], "argument --bf16: expected a boolean (true/false, yes/no, 1/0), got 'nope'"),
    (["--bf16", "nope"], "argument --bf16: expected a boolean (true/false, yes/no, 1/0), got 'nope'"),
    (["--layout", "ragged"], "argument --layout: invalid choice: 'ragged'"),
    (["--epsilon", "2"], "argument --epsilon: epsilon=2.0 is invalid: must be in [0, 1)"),
    (["--fp16", "--bf16"], "argument --fp16: fp16=True is invalid: must be False when bf16=True"),
    (["--betta=0.2"], "unrecognized arguments: --betta=0.2 (did you mean --beta?)"),
    (["--no_such_key", "1"], "unrecognized arguments: --no_such_key 1"),
    (["--learn=1"], "unrecognized arguments: --learn=1"),  # no abbreviations
    (["--resume", "--resume_from_checkpoint", "ck"], "not allowed with argument --resume"),
])
def test_flag_errors_are_one_line_usage_errors_naming_the_key(capsys, cfg, argv, message):
    assert message in usage_error(capsys, "train", cfg, *argv)


@pytest.mark.parametrize("text, message", [
    ("betta: 0.2\n", "unknown config keys ['betta'] (did you mean 'beta'?)"),
    ("max-length: 64\n", "unknown config keys ['max-length'] (did you mean 'max_length'?)"),
    ("bf16: nope\n", "bf16='nope' is invalid: must be a bool"),
    ("max_steps: 2.5\n", "max_steps=2.5 is invalid: must be an integer"),
    ("beta: abc\n", "beta='abc' is invalid: must be a finite number"),
    ("learning_rate: .inf\n", "learning_rate=inf is invalid"),
    ("train_data: [a, b]\n", "train_data=['a', 'b'] is invalid: must be a path or hub id"),
    ("max_length: 1000000000000000000000000000000\n", "max_length=1000000000000000000000000000000 is invalid: "
                                                      "must be an integer of at most 2147483647"),
    ("per_device_train_batch_size: 1000000000000000000000000000000\n", "per_device_train_batch_size=1"),
    ("max_tokens_per_batch: 1000000000000000000000000000000\n", "max_tokens_per_batch=1"),
    ("device: banana\n", "device='banana' is invalid: must be None or a torch device"),
    ("lora_target_modules: []\n", "lora_target_modules=[] is invalid"),
    ("chat_template_path: tokenizer_dir\n", "chat_template_path='tokenizer_dir' is invalid: must be None or a .jinja or .j2"),
    ("seed: 1" + "0" * 5000 + "\n", "a value cannot be read"),  # over Python's 4300-digit int limit
    # a collective that may never time out (0, negative) or only after decades is refused, as is a fraction
    ("ddp_timeout: 0\n", "ddp_timeout=0 is invalid: must be an integer number of seconds in [1, 2147483647]"),
    ("ddp_timeout: -30\n", "ddp_timeout=-30 is invalid: must be an integer number of seconds in [1, 2147483647]"),
    ("ddp_timeout: 2147483648\n", "ddp_timeout=2147483648 is invalid: must be an integer of at most 2147483647"),
    ("ddp_timeout: 1.5\n", "ddp_timeout=1.5 is invalid: must be an integer"),
    ("ddp_timeout: 30m\n", "ddp_timeout='30m' is invalid: must be an integer"),
])
def test_yaml_errors_are_one_line_usage_errors_naming_the_key(capsys, tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain_data: d\n" + text)
    line = usage_error(capsys, "train", str(path))
    assert f"error: {path}: {message}" in line


def test_other_config_file_errors(capsys, tmp_path):
    assert "nope.yaml: no such file" in usage_error(capsys, "train", str(tmp_path / "nope.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n")
    assert "expected a mapping of config keys, got list" in usage_error(capsys, "train", str(tmp_path / "list.yaml"))
    (tmp_path / "broken.yaml").write_text("a: [\n")
    assert "broken.yaml: not valid YAML" in usage_error(capsys, "train", str(tmp_path / "broken.yaml"))
    (tmp_path / "empty.yaml").write_text("")
    line = usage_error(capsys, "train", str(tmp_path / "empty.yaml"))
    assert "model and train_data required" in line and "--model_name_or_path (or --model)" in line \
        and "--dataset_name (or --train_data)" in line
    # no YAML: the flags say everything (TRL's dpo.py commands), so what is missing is the model and data
    assert usage_error(capsys, "train").endswith("model and train_data required (the model and the training data to "
                                                 "use): pass --model_name_or_path (or --model) and --dataset_name (or "
                                                 "--train_data)")


def billion_laughs(levels: int = 9) -> str:
    """A few hundred bytes that stand for 9**levels strings once every alias is expanded."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]" for k in range(1, levels)]
    return "\n".join(lines) + "\n"


HOSTILE_YAML = {
    "alias bomb": (billion_laughs(), "expands to more than 4,194,304 characters once its aliases are expanded"),
    "alias bomb under a field": ("model: m\ntrain_data: d\n" + billion_laughs().replace("a0: &a0", "x: &a0", 1)
                                 .replace("a8: &a8", "model_init_kwargs: &a8", 1), "expands to more than 4,194,304 characters"),
    "one long string repeated": ("model: &s " + "x" * 500_000 + "\ntrain_data: [" + ", ".join(["*s"] * 20) + "]\n",
                                 "expands to more than 4,194,304 characters"),
    "deep nesting": ("model_init_kwargs: " + "[" * 10_000 + "]" * 10_000 + "\n", "nested more than 64 levels deep"),
    "deep mappings": ("a:\n" + "".join(" " * k + "b:\n" for k in range(1, 200)), "nested more than 64 levels deep"),
    "huge file": ("# " + "x" * (1 << 20) + "\n", "too large for a config file"),
}


@pytest.mark.parametrize("name", HOSTILE_YAML)
def test_hostile_yaml_is_refused_fast_in_one_short_line(capsys, tmp_path, name):
    import time

    text, message = HOSTILE_YAML[name]
    path = tmp_path / "run.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message) as error:
        TrainConfig.from_yaml(path, extras=dict.fromkeys(RUN_KEYS))
    assert len(str(error.value)) < 400 + len(str(path))
    line = usage_error(capsys, "train", str(path))  # exit 2, one line, no traceback
    assert message in line and len(line) < 500 + len(str(path))
    assert time.perf_counter() - start < 10  # unbounded, the alias bomb takes gigabytes and minutes


@pytest.mark.parametrize("text", [
    "beta: " + "x" * 100_000 + "\n",  # a huge wrong value
    "beta: [" + ", ".join(["lol"] * 20_000) + "]\n",
    "model_init_kwargs: {x: &b [" + ", ".join(["lol"] * 1000) + "]}\nbeta: [" + ", ".join(["*b"] * 50) + "]\n",
    "".join(f"key{k}: 1\n" for k in range(5000)),  # thousands of unknown keys
    "lora_r: " + "9" * 4000 + "\n",  # a number whose digits alone are 4 kB
    "train_data: [" + ", ".join(["x" * 1000] * 500) + "]\n",  # a run key of the wrong type
    "dataset_name: " + "y" * 100_000 + "\n",  # two names for one thing, one of them huge
])
def test_a_huge_bad_value_is_never_echoed_in_full(capsys, tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain_data: d\n" + text)
    line = usage_error(capsys, "train", str(path))
    assert "is invalid" in line or "unknown config keys" in line
    assert len(line) < 800 + len(str(path))


def test_resume_flags_keep_the_config_path(trainer, cfg):
    assert train("--resume", cfg)["resume"] is True
    assert train(cfg, "--resume")["resume"] is True
    assert train("--resume_from_checkpoint", "out/checkpoint-4", cfg)["resume"] == "out/checkpoint-4"
    assert train(cfg, "--resume-from-checkpoint=ck")["resume"] == "ck"
    assert train(cfg)["resume"] is None


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"epsdpo {epsdpo.__version__}\n"


@pytest.mark.parametrize("flags", [
    ["--max_length", "64", "--max_prompt_length", "32", "--max_completion_length", "16", "--cache_dir", "c",
     "--skip_invalid", "--split", "train"],
    ["--max-length", "64", "--max-prompt-length=32", "--max-completion-length=16", "--cache-dir", "c", "--skip-invalid",
     "--split=train"],
    # train's spellings of the same keys
    ["--max_length", "64", "--max_prompt_length", "32", "--max_completion_length", "16", "--dataset_cache_dir", "c",
     "--skip_invalid", "--train_split", "train"],
    ["--max_length=64", "--max_prompt_length=32", "--max_completion_length=16", "--dataset-cache-dir=c",
     "--skip_invalid", "--dataset_train_split=train"],
])
def test_prepare_takes_the_underscore_flags_and_the_dashed_ones(monkeypatch, capsys, tmp_path, flags):
    seen = {}

    def load_preferences(data, tokenizer, **kwargs):
        seen.update(kwargs, data=data, tokenizer=tokenizer)
        return SimpleNamespace(save=lambda path: seen.update(saved=path)), "a report"

    monkeypatch.setattr(epsdpo.models, "load_tokenizer", lambda source: f"tokenizer of {source}")
    monkeypatch.setattr(epsdpo.data, "load_preferences", load_preferences)
    (tmp_path / "pairs.jsonl").write_text("")
    out = str(tmp_path / "pairs.store")
    assert main(["prepare", str(tmp_path / "pairs.jsonl"), "--tokenizer", "tok", *flags, "--output", out]) == 0
    truncation = epsdpo.Truncation(max_length=64, max_prompt_length=32, max_completion_length=16)
    assert seen == dict(data=str(tmp_path / "pairs.jsonl"), tokenizer="tokenizer of tok", truncation=truncation,
                        cache_dir="c", skip_invalid=True, saved=out, max_row_bytes=None, chat_template=None)
    assert "a report" in capsys.readouterr().out


def test_demo_takes_the_underscore_flags_and_the_dashed_ones():
    args = build_parser().parse_args(["demo", "--max_steps", "3", "--output-dir", "o", "--learning_rate=1e-4",
                                      "--bf16"])
    assert (args.max_steps, args.output_dir, args.learning_rate, args.bf16) == (3, "o", 1e-4, True)


def test_from_yaml_hands_the_run_keys_to_extras(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain_data: d\nbeta: 0.3\n")
    run = dict.fromkeys(RUN_KEYS)
    config = TrainConfig.from_yaml(path, {"max_steps": 3, "model": "n"}, extras=run)
    assert (config.beta, config.max_steps) == (0.3, 3)
    assert (run["model"], run["train_data"], run["eval_data"]) == ("n", "d", None)
    with pytest.raises(ValueError, match=r"unknown config keys \['model', 'train_data'\]"):
        TrainConfig.from_yaml(path)


def test_a_used_output_dir_is_a_one_line_error(tmp_path):
    from tiny import tiny_llama, toy_store

    tiny_llama().save_pretrained(tmp_path / "model")
    toy_store(16).save(tmp_path / "train.store")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "run.yaml").write_text(
        f"model: {tmp_path / 'model'}\ntrain_data: {tmp_path / 'train.store'}\noutput_dir: {tmp_path / 'out'}\n"
        "max_steps: 1\nmax_length: 32\nmax_prompt_length: 16\nprogress: false\n")
    with pytest.raises(SystemExit, match=r"^epsdpo train: output_dir .* holds another run's outputs \(metrics.jsonl"):
        main(["train", str(tmp_path / "run.yaml")])


def test_trl_names_for_the_model_and_the_data():
    run = RunArguments(model_name_or_path="m", dataset_name="d.jsonl")
    assert (run.model, run.train_data) == ("m", "d.jsonl")
    with pytest.raises(ValueError, match="model_name_or_path='m' is invalid: must be unset when model is set"):
        RunArguments(model="other", model_name_or_path="m")
