"""A TRL user's DPO YAML runs unchanged but for the paths: the keys of TRL's CLI documentation
(`trl dpo --config dpo_config.yaml`) and the DPOConfig / ModelConfig fields users put beside them."""

from __future__ import annotations

import json

from epsdpo.cli import main
from test_data import build_tokenizer
from tiny import tiny_llama

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
truncation_mode: keep_start
disable_dropout: true
sync_ref_model: false
use_peft: true
lora_r: 8
lora_alpha: 16
lora_target_modules: [q_proj, v_proj]
seed: 42
"""


def test_a_trl_dpo_yaml_runs_unchanged(tmp_path):
    tokenizer = build_tokenizer()
    tiny_llama(0, vocab=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"prompt": f"Question {i}: what is the answer?", "chosen": "The answer is 42.",
             "rejected": "I do not know."} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "dpo_config.yaml"
    config.write_text(TRL_YAML.format(model=tmp_path / "model", data=tmp_path / "pairs.jsonl", out=tmp_path / "out"))
    assert main(["train", str(config)]) == 0
    final = tmp_path / "out" / "final"
    assert (final / "adapter_config.json").is_file()  # use_peft trained LoRA adapters
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # report_to: none
