"""Code written for TRL's DPOTrainer runs on epsdpo with only its import changed: TRL's quick-start,
the DPOTrainer call's keywords and positions, a TRL `DPOConfig` as `args` (every one of its fields
taken with TRL's meaning or refused by name), `peft_config`, `save_model()` and `push_to_hub()`."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from transformers import TrainerCallback

import epsdpo
from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from epsdpo.trl_compat import TrlSettingError, as_train_config
from test_data import build_tokenizer
from tiny import tiny_llama, toy_store

trl = pytest.importorskip("trl")


def dpo_config(**fields):
    """A TRL DPOConfig as a user on a machine without bf16 makes one (TRL's bf16 default needs a GPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5's gradient_checkpointing rename
        return trl.DPOConfig(**{"output_dir": "unused", "bf16": False, **fields})


def small_config(tmp_path, **fields):
    return TrainConfig(output_dir=str(tmp_path / "out"), max_steps=1, max_length=32, progress=False, plots=False,
                       report_to="none", **fields)


# ------------------------------------------------------------------------------ TRL's quick-start
def local_model_and_data(tmp_path):
    """What the quick-start loads from the hub, as local files: a tiny model with its tokenizer, and
    preference rows in TRL's standard format."""
    tokenizer = build_tokenizer()
    tiny_llama(0, vocab=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"prompt": f"Question {i}: what is the answer?", "chosen": " The answer is 42.",
             "rejected": " I do not know."} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "model"), str(tmp_path / "pairs.jsonl")


@pytest.mark.parametrize("config_from", ["epsdpo", "trl"])
def test_trls_quick_start_runs_with_only_the_import_changed(tmp_path, config_from):
    """TRL 1.16's DPOTrainer quick-start: `from trl import DPOConfig, DPOTrainer` became `from epsdpo
    import ...` (config_from=epsdpo), or only DPOTrainer comes from epsdpo and the config stays TRL's.
    Hub ids are local paths, and max_steps keeps the run short (TRL's bf16 default needs a GPU)."""
    model_id, data_file = local_model_and_data(tmp_path)
    if config_from == "epsdpo":
        from epsdpo import DPOConfig, DPOTrainer
    else:
        from trl import DPOConfig

        from epsdpo import DPOTrainer
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_id)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    train_dataset = load_dataset("json", data_files=data_file, split="train")
    before = [p.detach().clone() for p in model.parameters()]

    training_args = DPOConfig(output_dir=str(tmp_path / "Tiny-DPO"), max_steps=2, bf16=False)
    trainer = DPOTrainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=train_dataset)
    trainer.train()

    assert trainer.state.global_step == 2
    assert trainer.args.output_dir == str(tmp_path / "Tiny-DPO")
    # TRL's defaults for the names it shares, its gradient_checkpointing=True among them when the config is TRL's
    assert trainer.args.gradient_checkpointing is (config_from == "trl")
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))


# ------------------------------------------------------------------------------- the call's shape
def test_trls_keywords_reach_the_trainer(tmp_path):
    reference, callback = tiny_llama(1), TrainerCallback()
    store, held_out = toy_store(8), toy_store(4, seed=3)
    trainer = Trainer(model=tiny_llama(0), ref_model=reference, args=small_config(tmp_path), train_dataset=store,
                      eval_dataset=held_out, processing_class=None, callbacks=[callback], peft_config=None)
    assert trainer.ref_model is reference and trainer.callbacks == [callback]
    assert (len(trainer.train_store), len(trainer.eval_store)) == (8, 4)
    assert trainer.args is trainer.config and trainer.processing_class is trainer.tokenizer


def test_trls_positional_order_is_taken(tmp_path):
    """model, ref_model, args, data_collator, train_dataset, eval_dataset, as in TRL's signature."""
    reference = tiny_llama(1)
    trainer = Trainer(tiny_llama(0), reference, small_config(tmp_path), None, toy_store(8), toy_store(4, seed=3))
    assert trainer.ref_model is reference and len(trainer.eval_store) == 4


def test_the_earlier_form_still_works(tmp_path):
    """A config in the second position cannot be a reference model: Trainer(model, config, data, ...)."""
    reference = tiny_llama(1)
    trainer = Trainer(tiny_llama(0), small_config(tmp_path), toy_store(8), ref_model=reference, tokenizer=None)
    assert trainer.ref_model is reference and len(trainer.train_store) == 8 and trainer.callbacks == []


@pytest.mark.parametrize(("name", "value"), [
    ("data_collator", lambda rows: rows), ("compute_metrics", lambda prediction: {}),
    ("optimizers", (object(), None)), ("quantization_config", object()),
])
def test_trl_arguments_epsdpo_does_not_take_are_refused_by_name(tmp_path, name, value):
    with pytest.raises(TrlSettingError, match=rf"^{name}=.* is not supported: \S"):
        Trainer(tiny_llama(0), args=small_config(tmp_path), train_dataset=toy_store(8), **{name: value})
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written


@pytest.mark.parametrize("several", [lambda d: {"a": d, "b": d}, lambda d: __import__("datasets").DatasetDict(
    train=d, test=d)])
def test_several_named_eval_sets_are_refused(tmp_path, several):
    """TRL evaluates each under its own prefix (eval_test_loss, ...); epsdpo evaluates one dataset."""
    import datasets

    rows = datasets.Dataset.from_list([{"prompt": "Q?", "chosen": "yes", "rejected": "no"}] * 2)
    with pytest.raises(TrlSettingError, match=r"^eval_dataset=\['.*'\] is not supported: one dataset, not several"):
        Trainer(tiny_llama(0), args=small_config(tmp_path), train_dataset=toy_store(8), eval_dataset=several(rows))


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, c, d: Trainer(m, args=c, config=c, train_dataset=d), "both args= and config="),
    (lambda m, c, d: Trainer(m, c, d, tokenizer="t", processing_class="t"), "both processing_class= and tokenizer="),
    (lambda m, c, d: Trainer(m, c, d, train_dataset=d), "multiple values for argument 'train_dataset'"),
    (lambda m, c, d: Trainer(m, None, c, None, d, ref_model=m), "multiple values for argument 'ref_model'"),
    (lambda m, c, d: Trainer(m, args=c), "needs train_dataset"),
    (lambda m, c, d: Trainer(m, c, d, None, None, None, None), "at most 6 positional arguments"),
    (lambda m, c, d: Trainer(m, args={"beta": 0.1}, train_dataset=d), "TrainConfig or a TRL DPOConfig, got a dict"),
])
def test_an_ambiguous_call_is_a_type_error(tmp_path, call, message):
    with pytest.raises(TypeError, match=message):
        call(tiny_llama(0), small_config(tmp_path), toy_store(8))


def test_without_args_the_output_dir_is_trls_model_name_dpo(tmp_path, monkeypatch):
    model_id, data_file = local_model_and_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(model=model_id, train_dataset=data_file)
    assert trainer.args.output_dir == "model-DPO"


def test_a_lora_peft_config_trains_lora_adapters(tmp_path):
    from peft import LoraConfig, PeftModel

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = Trainer(tiny_llama(0), args=small_config(tmp_path), train_dataset=toy_store(8), peft_config=lora)
    c = trainer.config
    assert (c.use_peft, c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_target_modules) == (
        True, 4, 8, 0.0, ["q_proj", "v_proj"])
    assert isinstance(trainer.model, PeftModel)
    assert {n.split(".")[-3] for n, p in trainer.model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_peft_config_settings_epsdpo_does_not_build_are_refused(tmp_path):
    from peft import LoraConfig

    with pytest.raises(TrlSettingError, match=r"^peft_config.use_dora=True is not supported: "):
        Trainer(tiny_llama(0), args=small_config(tmp_path), train_dataset=toy_store(8),
                peft_config=LoraConfig(r=4, use_dora=True))
    with pytest.raises(TypeError, match="peft_config= and a config with use_peft=True"):
        Trainer(tiny_llama(0), args=small_config(tmp_path, use_peft=True), train_dataset=toy_store(8),
                peft_config=LoraConfig(r=4))


# ------------------------------------------------------------------------------ DPOConfig as args
class Unset:
    """A value no field of DPOConfig has by default, nor accepts."""

    def __repr__(self):
        return "<a value of its own>"


def test_every_dpo_config_field_is_taken_or_refused():
    """Each of DPOConfig's fields (its own and the ~130 of transformers' TrainingArguments) set to a value
    of the user's own reaches TrainConfig or is refused naming the field, or (a loader, hub or logging
    knob of epsdpo.trl_keys.WITHOUT_EFFECT) is accepted and said to have no effect; none is dropped unread."""
    from epsdpo import trl_keys

    base = dpo_config()
    fields = [f.name for f in dataclasses.fields(base) if f.init]
    assert len(fields) > 130
    as_train_config(base)  # DPOConfig's defaults: nothing to refuse
    for name in fields:
        changed = copy.copy(base)
        setattr(changed, name, Unset())
        if name in trl_keys.WITHOUT_EFFECT:
            with pytest.warns(UserWarning, match=rf"^{name} has no effect: \S"):
                as_train_config(changed)
            continue
        with pytest.raises(ValueError, match=rf"^{name}=<a value of its own> is (invalid|not supported): \S") as error:
            as_train_config(changed)
        assert "\n" not in str(error.value)


def test_shared_fields_take_trls_values():
    config = as_train_config(dpo_config(
        output_dir="runs/x", learning_rate=5e-7, beta=0.3, max_steps=7, per_device_train_batch_size=2,
        gradient_accumulation_steps=4, lr_scheduler_type="cosine", warmup_steps=0.1, eval_strategy="steps",
        eval_steps=3, save_strategy="no", logging_strategy="epoch", report_to="tensorboard", max_length=64,
        seed=3, pad_to_multiple_of=8, sync_ref_model=True, ref_model_sync_steps=16, gradient_checkpointing=False,
        loss_type="sigmoid", precompute_ref_log_probs=False, disable_dropout=False, padding_free=True,
    ))
    assert (config.output_dir, config.learning_rate, config.beta, config.max_steps, config.per_device_train_batch_size,
            config.gradient_accumulation_steps) == ("runs/x", 5e-7, 0.3, 7, 2, 4)
    assert (config.lr_scheduler_type, config.warmup_steps, config.eval_strategy, config.eval_every(),
            config.save_strategy, config.logging_strategy) == ("cosine", 0.1, "steps", 3, "no", "epoch")
    assert (config.report_to, config.max_length, config.seed, config.pad_to_multiple_of, config.sync_ref_model,
            config.ref_model_sync_steps) == ("tensorboard", 64, 3, 8, True, 16)
    assert (config.gradient_checkpointing, config.loss_type, config.disable_dropout, config.layout) == (
        False, "sigmoid", False, "packed")


def test_trl_values_that_mean_the_same_under_another_form():
    default = as_train_config(dpo_config())
    # TRL's report_to none is no logging integration: metrics.jsonl alone here, TrainConfig's own default
    assert (default.report_to, default.pad_to_multiple_of, default.fsdp, default.device) == ("jsonl", 1, False, None)
    assert default.save_every() == 500  # TRL's save_strategy=steps, save_steps=500
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert as_train_config(trl.DPOConfig(bf16=False)).output_dir == "trainer_output"  # TRL's computed default
    assert as_train_config(dpo_config(fsdp="full_shard auto_wrap")).fsdp is True
    assert as_train_config(dpo_config(use_cpu=True)).device == "cpu"
    assert as_train_config(dpo_config(disable_tqdm=True)).progress is False
    assert as_train_config(dpo_config(activation_checkpointing=False)).gradient_checkpointing is False
    # TrainConfig fields with transformers' meaning, taken as given
    assert as_train_config(dpo_config(gradient_checkpointing_kwargs={"use_reentrant": True})) \
        .gradient_checkpointing_kwargs == {"use_reentrant": True}
    taken = as_train_config(dpo_config(adam_epsilon=1e-6, logging_first_step=True, save_only_model=True))
    assert (taken.adam_epsilon, taken.logging_first_step, taken.save_only_model, taken.optim) == \
        (1e-6, True, True, "adamw_torch_fused")  # TRL's default optimizer


def test_a_dpo_config_field_without_effect_is_taken_and_said():
    with pytest.warns(UserWarning, match=r"^dataloader_num_workers has no effect: batches are cut"):
        as_train_config(dpo_config(dataloader_num_workers=4))


def test_fields_transformers_derives_from_the_set_ones_are_not_refused():
    """eval_strategy=steps makes TrainingArguments set do_eval (and eval_steps from logging_steps): the
    user chose the strategy, not those."""
    config = as_train_config(dpo_config(eval_strategy="steps", logging_steps=5))
    assert config.eval_every() == 5


@pytest.mark.parametrize(("fields", "refused"), [
    (dict(use_liger_kernel=True), r"use_liger_kernel=True"),
    (dict(neftune_noise_alpha=5.0), r"neftune_noise_alpha=5.0"),
    (dict(fsdp="shard_grad_op"), r"fsdp_config=\{.*'reshard_after_forward': False.*\}"),
    (dict(torch_compile=True), r"torch_compile=True"),
    (dict(label_smoothing_factor=0.1), r"label_smoothing_factor=0.1"),
])
def test_a_set_field_epsdpo_does_not_do_is_refused_by_name(fields, refused):
    with pytest.raises(TrlSettingError, match=rf"^{refused} is not supported: \S"):
        as_train_config(dpo_config(**fields))


def test_a_shared_field_epsdpo_refuses_names_it():
    with pytest.raises(ValueError, match=r"^loss_type='ipo' is invalid: must be 'sigmoid'"):
        as_train_config(dpo_config(loss_type="ipo"))


# ----------------------------------------------------------------------------- save_model, push_to_hub
def test_save_model_without_a_path_saves_to_output_dir(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = Trainer(tiny_llama(0), args=small_config(tmp_path), train_dataset=toy_store(8))
    trainer.train()
    trainer.save_model()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trainer.model.state_dict().values()))


def test_push_to_hub_is_refused_with_the_reason(tmp_path):
    trainer = Trainer(tiny_llama(0), args=small_config(tmp_path), train_dataset=toy_store(8))
    with pytest.raises(NotImplementedError, match=r"^push_to_hub\(\) is not supported: .*upload_folder"):
        trainer.push_to_hub(commit_message="done")


def test_trls_names_are_exported():
    assert epsdpo.DPOTrainer is Trainer and epsdpo.DPOConfig is TrainConfig
    assert {"DPOTrainer", "DPOConfig"} <= set(epsdpo.__all__)
