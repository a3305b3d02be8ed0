"""A TRL user's DPO YAML runs unchanged but for the paths: the keys of TRL's CLI documentation
(`trl dpo --config dpo_config.yaml`) and the DPOConfig / ModelConfig / TrainingArguments fields users
put beside them, with TRL's meanings (the interval strategies among them)."""

from __future__ import annotations

import json

import pytest

from epsdpo.cli import main
from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from test_data import build_tokenizer
from tiny import tiny_llama, toy_store

# TRL's shape, values as a user writes them; only model_name_or_path and dataset_name are local paths
TRL_YAML = """\
model_name_or_path: {model}
dataset_name: {data}
report_to: none
output_dir: {out}
learning_rate: 5.0e-7
lr_scheduler_type: cosine
warmup_steps: 0.1
num_train_epochs: 1
max_steps: 2
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
gradient_checkpointing: true
logging_steps: 1
beta: 0.1
max_length: 64
max_completion_length: 32
truncation_mode: keep_start
bf16: false
logging_strategy: steps
eval_strategy: no
save_strategy: steps
save_steps: 1
remove_unused_columns: false
push_to_hub: false
disable_dropout: true
sync_ref_model: false
use_peft: true
lora_r: 8
lora_alpha: 16
lora_target_modules: [q_proj, v_proj]
seed: 42
"""


def model_and_data(tmp_path):
    tokenizer = build_tokenizer()
    tiny_llama(0, vocab=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"prompt": f"Question {i}: what is the answer?", "chosen": "The answer is 42.",
             "rejected": "I do not know."} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "model", tmp_path / "pairs.jsonl"


def test_a_trl_dpo_yaml_runs_unchanged(tmp_path):
    model, data = model_and_data(tmp_path)
    config = tmp_path / "dpo_config.yaml"
    config.write_text(TRL_YAML.format(model=model, data=data, out=tmp_path / "out"))
    assert main(["train", str(config)]) == 0
    final = tmp_path / "out" / "final"
    assert (final / "adapter_config.json").is_file()  # use_peft trained LoRA adapters
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # report_to: none
    # save_strategy: steps with save_steps: 1 (the newest checkpoints stay; older ones may be pruned)
    assert (tmp_path / "out" / "checkpoint-2").is_dir()


def test_trls_script_flags_run_unchanged(tmp_path):
    """The flags of TRL's `trl/scripts/dpo.py` example command, paths and sizes aside."""
    model, data = model_and_data(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(f"eval_data: {data}\nreport_to: jsonl\nprogress: false\nplots: false\n")
    assert main(["train", str(config), "--dataset_name", str(data), "--model_name_or_path", str(model),
                 "--learning_rate", "5.0e-7", "--num_train_epochs", "1", "--per_device_train_batch_size", "2",
                 "--max_steps", "3", "--gradient_accumulation_steps", "1", "--eval_strategy", "steps",
                 "--eval_steps", "2", "--output_dir", str(tmp_path / "out"), "--no_remove_unused_columns"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval_loss" in r] == [2, 3]  # every eval_steps, and at the end


def test_push_to_hub_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"^push_to_hub=True is invalid: .*no hub upload"):
        TrainConfig(push_to_hub=True)


def test_a_bare_yaml_no_is_the_strategy_no(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("eval_strategy: no\nsave_strategy: no\nlogging_strategy: no\n")
    config = TrainConfig.from_yaml(path)
    assert (config.eval_strategy, config.save_strategy, config.logging_strategy) == ("no", "no", "no")


def test_strategies_default_steps_as_in_trl():
    assert TrainConfig(eval_strategy="steps", logging_steps=5).eval_every() == 5  # eval_steps falls back
    assert TrainConfig(save_strategy="steps").save_every() == 500  # TRL's default save_steps
    assert TrainConfig(eval_steps=3).eval_every() == 3 and TrainConfig(save_steps=3).save_every() == 3
    assert TrainConfig(eval_strategy="no", eval_steps=3).eval_every() is None
    assert TrainConfig(save_strategy="epoch", save_steps=3).save_every() is None


def run_strategies(tmp_path, **overrides):
    """24 pairs in batches of 8: epochs end at steps 3 and 6."""
    config = TrainConfig(output_dir=str(tmp_path / "run"), method="dpo", per_device_train_batch_size=8, max_steps=4,
                         max_length=32, progress=False, plots=True, **overrides)
    trainer = Trainer(tiny_llama(0), config, toy_store(24), eval_dataset=toy_store(8, seed=5))
    trainer.train()
    history = trainer.state.log_history
    return ([r["step"] for r in history if "loss" in r], [r["step"] for r in history if "eval_loss" in r],
            [int(c.name.split("-")[1]) for c in trainer.checkpoints()])


@pytest.mark.parametrize(("knobs", "logged", "evaluated", "saved"), [
    (dict(logging_steps=2, eval_strategy="steps", save_strategy="steps", save_steps=2), [2, 4], [2, 4], [2, 4]),
    (dict(logging_strategy="epoch", eval_strategy="epoch", save_strategy="epoch"), [3, 4], [3, 4], [3]),
    (dict(logging_strategy="no", eval_strategy="no", eval_steps=1, save_strategy="no", save_steps=1), [], [], []),
    (dict(eval_steps=3, save_steps=3), [1, 2, 3, 4], [3, 4], [3]),  # no strategies: the steps alone decide
])
def test_interval_strategies_mean_what_they_mean_in_trl(tmp_path, knobs, logged, evaluated, saved):
    assert run_strategies(tmp_path, **knobs) == (logged, evaluated, saved)
