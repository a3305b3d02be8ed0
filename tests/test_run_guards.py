"""What stops a run before it goes wrong: a used output_dir, weights made non-finite by a step, data
with nothing to train on or tokens the model cannot embed, and config values of the wrong type or
range (each error names the field)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import epsdpo
from epsdpo.config import TrainConfig
from epsdpo.trainer import NonFiniteError, Trainer
from tiny import VOCAB, tiny_llama, toy_store


def config(out, **overrides) -> TrainConfig:
    base = dict(output_dir=str(out), beta=0.1, epsilon=0.1, learning_rate=3e-3, per_device_train_batch_size=8,
                max_steps=3, warmup_ratio=0.0, lr_scheduler_type="constant", max_length=32, max_prompt_length=16,
                progress=False, plots=False, seed=3, logging_steps=1)
    base.update(overrides)
    return TrainConfig(**base)


def steps_logged(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "train_runtime" not in r]  # not the run's closing summary


def test_a_fresh_run_refuses_another_runs_output_dir(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_llama(0), config(out, max_steps=6, save_steps=2, save_total_limit=1), toy_store()).train()
    with pytest.raises(FileExistsError, match=r"holds another run's outputs \(.*checkpoint-6.*overwrite_output_dir"):
        Trainer(tiny_llama(0), config(out), toy_store()).train()
    # Overwriting clears the old run: pruning keeps this run's newest checkpoint and metrics restart
    Trainer(tiny_llama(0), config(out, save_steps=1, save_total_limit=1, overwrite_output_dir=True), toy_store()).train()
    assert [p.name for p in epsdpo.trainer.list_checkpoints(out)] == ["checkpoint-3"]
    assert steps_logged(out) == [1, 2, 3]


def test_metrics_left_by_a_crash_before_the_first_checkpoint_are_not_mixed_in(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n')
    with pytest.raises(FileExistsError, match="metrics.jsonl"):
        Trainer(tiny_llama(0), config(out), toy_store()).train()


def test_resuming_earlier_keeps_the_checkpoint_just_written(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_llama(0), config(out, max_steps=6, save_steps=1), toy_store()).train()
    resumed = Trainer(tiny_llama(0), config(out, max_steps=4, save_steps=1, save_total_limit=1), toy_store())
    resumed.train(resume_from_checkpoint=out / "checkpoint-2")
    # checkpoint-5/6 belonged to the abandoned future; the newest of this run survives pruning
    assert [p.name for p in epsdpo.trainer.list_checkpoints(out)] == ["checkpoint-4"]
    assert steps_logged(out) == [1, 2, 3, 4]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_weights_made_non_finite_stop_the_run_before_saving(tmp_path, monkeypatch):
    trainer = Trainer(tiny_llama(0), config(tmp_path / "run", max_steps=4, save_steps=1), toy_store())
    real_step = trainer.optimizer.step
    calls = {"n": 0}

    def poisoned_step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = math.inf
        return result

    monkeypatch.setattr(trainer.optimizer, "step", poisoned_step)
    with pytest.raises(NonFiniteError, match=r"step 2: the optimizer step made weights non-finite \(learning rate"):
        trainer.train()
    assert [p.name for p in trainer.checkpoints()] == ["checkpoint-1"]


def test_a_dataset_emptied_by_truncation_is_an_error(tmp_path):
    store = epsdpo.PreferenceStore(vocab_size=VOCAB)
    for _ in range(4):
        store.add_pair(list(range(2, 20)), [3, 4], [5, 6])
    with pytest.raises(ValueError, match="no pair can be trained on: every completion of all 4 pairs is empty"):
        Trainer(tiny_llama(0), config(tmp_path / "run", max_length=16, max_prompt_length=None, skip_invalid=True), store)


def test_token_ids_beyond_the_embedding_are_refused_before_training(tmp_path):
    store = epsdpo.PreferenceStore()  # no vocabulary bound of its own
    store.add_pair([3, 4, 5], [6, 7], [8, 9])
    store.add_pair([3, 4, 5], [6, VOCAB + 5], [8, 9])
    with pytest.raises(ValueError, match=rf"pair 1: token id {VOCAB + 5} is beyond the model's embedding \({VOCAB} rows"):
        Trainer(tiny_llama(0), config(tmp_path / "run"), store)


BAD_VALUES = [
    ("seed", -1), ("seed", 2**70), ("max_length", -1), ("max_prompt_length", -1), ("num_train_epochs", math.inf),
    ("per_device_train_batch_size", "8"), ("per_device_train_batch_size", 2.0), ("beta_dpo_alpha", -1.0),
    ("ref_model_sync_steps", 1.5), ("weight_decay", math.inf), ("learning_rate", math.inf), ("learning_rate", math.nan),
    ("bf16", "nope"), ("bf16", 1), ("beta", "abc"), ("layout", "ragged"), ("dtype", "int8"), ("max_steps", 0),
    ("adam_beta2", 1.0), ("max_grad_norm", math.inf), ("output_dir", ""), ("report_to", "comet_ml"),
    ("save_total_limit", 0), ("epsilon_check", 1.0), ("overwrite_output_dir", "yes"),
    # too large for the Rust core or torch: refused by name instead of an OverflowError deep inside
    ("max_length", 10**30), ("per_device_train_batch_size", 10**30), ("max_tokens_per_batch", 10**30),
    ("gradient_accumulation_steps", 2**31), ("max_steps", 10**30), ("lora_r", 10**30), ("seed", 2**32),
    ("num_train_epochs", 1e300), ("warmup_steps", 1e300), ("max_row_bytes", 0),
    # not a device torch trains on
    ("device", "banana"), ("device", "meta"), ("device", ""),
    ("lora_target_modules", []), ("lora_target_modules", [""]), ("lora_target_modules", 5),
    # the command line's JSON form: nested past the recursion limit, an integer over Python's 4300 digits
    ("model_init_kwargs", "[" * 100_000 + "]" * 100_000), ("model_init_kwargs", '{"a": ' + "1" * 5000 + "}"),
]


@pytest.mark.parametrize("field, value", BAD_VALUES)
def test_every_bad_value_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid: must be "):
        TrainConfig(**{field: value})


def test_a_device_this_machine_lacks_is_refused_by_the_trainer_naming_the_field(tmp_path):
    """A config naming a GPU is valid where it is written (a GPU cell checked on a laptop); the run that
    would train on it is refused before loading anything."""
    config = TrainConfig(output_dir=str(tmp_path), device="cuda:99")
    with pytest.raises(ValueError, match=r"^device='cuda:99' is invalid: must be a device this machine has"):
        Trainer(tiny_llama(0), config, toy_store())


@pytest.mark.parametrize("value, expected", [
    ("all-linear", "all-linear"), (["all-linear"], "all-linear"),  # TRL's value, as a string or one-name list
    (["q_proj", "v_proj"], ["q_proj", "v_proj"]), (".*proj", ".*proj"), (None, None)])
def test_lora_target_modules_take_peft_strings_and_lists(value, expected):
    assert TrainConfig(lora_target_modules=value).lora_target_modules == expected


def test_all_linear_adapts_every_linear_layer_but_the_head():
    from epsdpo.models import with_lora

    model = with_lora(tiny_llama(0), TrainConfig(use_peft=True, lora_target_modules="all-linear"))
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_numbers_are_widened_and_kept():
    config = TrainConfig(learning_rate=1, beta=np.float64(0.2).item(), max_length=None)
    assert isinstance(config.learning_rate, float) and config.learning_rate == 1.0
    assert config.beta == 0.2 and config.max_length is None


def test_warmup_steps_take_transformers_meaning():
    assert TrainConfig().warmup_steps_for(10) == 0  # TRL's default: no warm-up
    assert TrainConfig(warmup_steps=3).warmup_steps_for(10) == 3
    assert TrainConfig(warmup_steps=0.25).warmup_steps_for(10) == 3  # ceil(2.5), as transformers counts
    assert TrainConfig(warmup_ratio=0.1).warmup_steps_for(10) == 1
    with pytest.raises(ValueError, match="warmup_ratio=0.1 is invalid: must be 0 when warmup_steps is set"):
        TrainConfig(warmup_steps=2, warmup_ratio=0.1)


def test_dropout_is_off_by_default_and_on_when_asked(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def dropout_model():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             attention_dropout=0.5))
        model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.5))  # an nn.Dropout to switch off too
        return model

    off = Trainer(dropout_model(), config(tmp_path / "a"), toy_store())
    on = Trainer(dropout_model(), config(tmp_path / "b", disable_dropout=False), toy_store())
    for trainer, rate in ((off, 0.0), (on, 0.5)):
        for model in (trainer.model, trainer.ref_model):
            assert model.model.layers[0].self_attn.attention_dropout == rate
            assert model.model.layers[0].mlp.drop.p == rate


def test_a_frozen_policy_or_the_reference_object_as_policy_is_refused_by_name(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="ref_model is the same object as model"):
        Trainer(model, config(tmp_path / "same"), toy_store(), ref_model=model)
    with pytest.raises(ValueError, match="model has no trainable parameter"):
        Trainer(tiny_llama().requires_grad_(False), config(tmp_path / "frozen"), toy_store())


@pytest.mark.parametrize(("settings", "named"), [
    (dict(eval_strategy="steps"), "eval_strategy='steps'"),
    (dict(eval_strategy="steps", eval_steps=2), "eval_strategy='steps'"),
    (dict(eval_strategy="epoch"), "eval_strategy='epoch'"),
    (dict(eval_steps=2), "eval_steps=2"),  # no strategy: eval_steps alone evaluates
])
def test_evaluation_asked_for_without_eval_data_is_refused_before_training(tmp_path, settings, named):
    with pytest.raises(ValueError, match=rf"^{named} asks for evaluation, but no eval_dataset was given: pass "
                                         r"eval_dataset .* or set eval_strategy='no'$"):
        Trainer(tiny_llama(0), config(tmp_path / "run", **settings), toy_store())
    assert not (tmp_path / "run").exists()


def test_eval_steps_under_eval_strategy_no_asks_for_nothing(tmp_path):
    trainer = Trainer(tiny_llama(0), config(tmp_path / "run", eval_strategy="no", eval_steps=2, max_steps=1),
                      toy_store())
    assert trainer.train().global_step == 1
