"""A run's outputs as a TRL user uses them: checkpoints and final/ load with `from_pretrained`, final/
has a model card, evaluation ends the run and reaches the console, and the logged learning rate
means what TRL's does."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_model

from epsdpo.checkpoint import MANIFEST, TRAINING_CONFIG
from epsdpo.config import TrainConfig
from epsdpo.model_card import RunFacts, model_card
from epsdpo.reporting import TIMINGS
from epsdpo.trainer import Trainer
from test_trainer import config, series
from tiny import VOCAB, tiny_llama, toy_store

IDS = torch.tensor([[3, 4, 5, 6, 7, 8]])


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def word_tokenizer():
    """A fast tokenizer over the tiny models' vocabulary (pad 0, EOS 1), to see it saved and reloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB - 1)}, "<unk>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


# ------------------------------------------------------------------ checkpoints are model folders
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied_embeddings"])
def test_every_checkpoint_loads_with_from_pretrained(tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = Trainer(tiny_llama(0, tie=tie), config(tmp_path, max_steps=2, save_steps=1), toy_store(),
                      tokenizer=word_tokenizer())
    trainer.train()
    out = tmp_path / "run"
    for step in (1, 2):
        checkpoint = out / f"checkpoint-{step}"
        loaded, info = AutoModelForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        # from_pretrained reads the weights resuming restores (epsdpo.checkpoint.load_checkpoint)
        resumed = tiny_llama(1, tie=tie)
        load_model(resumed, checkpoint / "model.safetensors")
        torch.testing.assert_close(logits(loaded), logits(resumed), rtol=0, atol=0)
        if tie:
            assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        assert AutoTokenizer.from_pretrained(checkpoint)("w5 w7")["input_ids"] == [5, 7]
        # the run's own settings moved out of config.json, which is now the model's
        assert json.loads((checkpoint / TRAINING_CONFIG).read_text()) == trainer.config.to_dict()
        model_config = json.loads((checkpoint / "config.json").read_text())
        assert (model_config["model_type"], model_config["architectures"]) == ("llama", ["LlamaForCausalLM"])
        listed = set(json.loads((checkpoint / MANIFEST).read_text())["files"])
        on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()} - {MANIFEST}
        assert listed == on_disk and {"config.json", "generation_config.json", TRAINING_CONFIG} <= listed
    # the last checkpoint is the final model
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")),
                               logits(trainer.model), rtol=0, atol=0)
    assert not torch.equal(logits(AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")), logits(trainer.model))


def test_a_peft_checkpoint_loads_its_adapter_with_from_pretrained(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    tiny_llama(0).save_pretrained(tmp_path / "base")  # the adapter names its base model by this path
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    policy = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = Trainer(policy, config(tmp_path, max_steps=2, save_steps=2, learning_rate=1e-2), toy_store())
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    torch.testing.assert_close(logits(loaded), logits(trainer.model), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(loaded), logits(tiny_llama(0)), atol=1e-4)  # the adapter was applied


@pytest.mark.slow
def test_a_sharded_checkpoint_has_the_model_config(tmp_path):
    from test_distributed import launch
    from transformers import AutoConfig

    if not Path(sys.executable).with_name("torchrun").exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    launch(tmp_path / "fsdp", 2, 2, "fsdp")
    checkpoint = tmp_path / "fsdp" / "checkpoint-2"
    model_config = AutoConfig.from_pretrained(checkpoint)
    assert model_config.model_type == "llama" and model_config.architectures == ["LlamaForCausalLM"]
    assert (checkpoint / TRAINING_CONFIG).is_file() and (checkpoint / "sharded" / ".metadata").is_file()


# ------------------------------------------------------------------------------- the model card
def test_final_has_a_model_card_with_the_beta_plot(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    toy_store().save(tmp_path / "pairs.store")
    trainer = Trainer(tiny_llama(0), config(tmp_path, max_steps=3, plots=True), str(tmp_path / "pairs.store"),
                      eval_dataset=toy_store(16, seed=5))
    trainer.train()
    final = tmp_path / "run" / "final"
    card = (final / "README.md").read_text()
    history = trainer.state.log_history
    last_train = [r for r in history if "loss" in r][-1]
    last_eval = [r for r in history if "eval_loss" in r][-1]
    for expected in ("library_name: transformers", "ε-DPO (`epsilon_dpo`)",
                     f"| β | 0.1 at the start, {trainer.kl.beta:.6g} at the end |",
                     "| ε | 0.1 (ε_c", "| training data | 64 preference pairs (`" + str(tmp_path / "pairs.store") + "`) |",
                     "| evaluation data | 16 preference pairs |", "| optimizer steps | 3 |",
                     f"| loss | {last_train['loss']:.4g} | 3 |",
                     f"| rewards/accuracies | {last_train['rewards/accuracies']:.4g} | 3 |",
                     f"| rewards/margins | {last_train['rewards/margins']:.4g} | 3 |",
                     f"| eval_loss | {last_eval['eval_loss']:.4g} | 3 |",
                     f"| eval_rewards/accuracies | {last_eval['eval_rewards/accuracies']:.4g} | 3 |"):
        assert expected in card, expected
    assert trainer.kl.beta != 0.1  # so the card's two β are two values
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert images == ["beta.png"]
    assert (final / images[0]).read_bytes() == (tmp_path / "run" / "plots" / "beta.png").read_bytes()
    AutoModelForCausalLM.from_pretrained(final)  # the card does not get in the model's way


def test_model_card_without_plot_names_only_hub_ids_in_its_metadata(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "mine"), method="dpo", beta=0.2)
    (tmp_path / "local").mkdir()
    run = RunFacts(steps=5, beta_initial=0.2, beta_final=0.2, train_pairs=10, base_model=str(tmp_path / "local"),
                   train_data="someone/pairs", history=[{"step": 5, "loss": 0.5}])
    card = model_card(cfg, run)
    assert card.startswith("---\nlibrary_name: transformers\ndatasets:\n- someone/pairs\ntags:")
    assert "base_model:" not in card  # a local folder is no hub id
    assert f"fine-tuned from `{tmp_path / 'local'}` with DPO" in card
    assert "| ε | not used by DPO |" in card and "| evaluation data | none |" in card
    assert "| loss | 0.5 | 5 |" in card and "![" not in card
    assert model_card(cfg, RunFacts(steps=1, beta_initial=0.2, beta_final=0.2, train_pairs=1,
                                    base_model="org/model")).count("base_model: org/model") == 1


# ------------------------------------------------------------------------- evaluation at the end
def evals(trainer):
    return [r["step"] for r in trainer.state.log_history if "eval_loss" in r]


@pytest.mark.parametrize("eval_steps,max_steps,expected", [(None, 3, [3]), (2, 3, [2, 3]), (2, 4, [2, 4])])
def test_eval_data_is_evaluated_at_the_end_once(tmp_path, capsys, eval_steps, max_steps, expected):
    trainer = Trainer(tiny_llama(0), config(tmp_path, max_steps=max_steps, eval_steps=eval_steps), toy_store(),
                      eval_dataset=toy_store(16, seed=5))
    trainer.train()
    assert evals(trainer) == expected
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval_loss" in r] == expected
    printed = [line for line in capsys.readouterr().out.splitlines() if " eval: " in line]
    last = [r for r in trainer.state.log_history if "eval_loss" in r][-1]
    assert len(printed) == len(expected)
    assert printed[-1] == (f"step {max_steps} eval: loss {last['eval_loss']:.4g} | rewards/accuracies "
                           f"{last['eval_rewards/accuracies']:.4g} | rewards/margins {last['eval_rewards/margins']:.4g}"
                           f" | kl/pair_beta_mean {last['eval_kl/pair_beta_mean']:.4g}")


def test_no_eval_data_no_evaluation(tmp_path, capsys):
    trainer = Trainer(tiny_llama(0), config(tmp_path, max_steps=2), toy_store())
    trainer.train()
    assert evals(trainer) == [] and " eval: " not in capsys.readouterr().out


def test_the_final_evaluation_keeps_resume_exact(tmp_path):
    eval_data = toy_store(16, seed=5)
    full = Trainer(tiny_llama(0), config(tmp_path, max_steps=4, save_steps=2), toy_store(), eval_dataset=eval_data)
    full.train()
    resumed = Trainer(tiny_llama(0), config(tmp_path / "resumed", max_steps=4), toy_store(), eval_dataset=eval_data)
    resumed.train(resume_from_checkpoint=tmp_path / "run" / "checkpoint-2")
    strip = lambda history: [{k: v for k, v in r.items() if k not in TIMINGS} for r in history]  # noqa: E731
    assert strip(resumed.state.log_history) == strip(full.state.log_history)
    assert evals(full) == [4]


# ------------------------------------------------------------------------------ the learning rate
PEAK = 1e-3


def test_logged_learning_rate_is_the_one_each_step_used(tmp_path):
    """Two of four steps warm up (ceil(0.5 · 4)), then cosine decay: the log shows the rate each step
    applied, so the first step logs 0.0, not the rate of the step after it."""
    trainer = Trainer(tiny_llama(0), config(tmp_path, max_steps=4, warmup_ratio=0.5, lr_scheduler_type="cosine",
                                            learning_rate=PEAK), toy_store())
    trainer.train()
    np.testing.assert_allclose(series(trainer, "learning_rate"), [0.0, PEAK / 2, PEAK, PEAK / 2], rtol=1e-12)


def test_logged_learning_rate_matches_transformers_trainer(tmp_path):
    """TRL's DPOTrainer logs what transformers' Trainer logs; run that on the same schedule."""
    import dataclasses

    import transformers
    from transformers import TrainingArguments
    from transformers import Trainer as HFTrainer

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("pinned to the transformers TRL 1.16 runs on (5.x)")
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    warmup = {"warmup_ratio": 0.5} if "warmup_ratio" in names else {"warmup_steps": 0.5}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, learning_rate=PEAK, lr_scheduler_type="cosine",
                             logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                             per_device_train_batch_size=2, **warmup)
    rows = [{"input_ids": torch.arange(2, 10), "labels": torch.arange(2, 10)} for _ in range(8)]
    hf = HFTrainer(model=tiny_llama(0), args=args, train_dataset=rows)
    hf.train()
    theirs = [r["learning_rate"] for r in hf.state.log_history if "learning_rate" in r]
    ours = Trainer(tiny_llama(0), config(tmp_path, max_steps=4, warmup_ratio=0.5, lr_scheduler_type="cosine",
                                         learning_rate=PEAK), toy_store())
    ours.train()
    np.testing.assert_allclose(series(ours, "learning_rate"), theirs, rtol=1e-12)


# ------------------------------------------------------- the outputs TRL's tools read, where they read them
def state_dict_of(path):
    """The model from_pretrained loads from `path` (its state dict), or None where it finds no model."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    except (OSError, ValueError):
        return None
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_output_dir_itself_loads_the_final_model(tmp_path):
    from transformers import AutoTokenizer

    trainer = Trainer(tiny_llama(0), config(tmp_path, max_steps=2), toy_store(), tokenizer=word_tokenizer())
    trainer.train()
    out = tmp_path / "run"
    at_root, final = state_dict_of(out), state_dict_of(out / "final")
    assert at_root is not None and same(at_root, final)
    assert same(at_root, {k: v for k, v in trainer.model.state_dict().items()})
    assert AutoTokenizer.from_pretrained(out)("w5 w7")["input_ids"] == [5, 7]
    assert (out / "README.md").read_text() == (out / "final" / "README.md").read_text()  # the model card too
    assert not list(out.glob(".*.tmp"))
    # a fresh run told to overwrite the folder clears the copy with the rest of the old run's outputs
    again = Trainer(tiny_llama(1), config(tmp_path, max_steps=1, overwrite_output_dir=True), toy_store())
    again.train()
    assert same(state_dict_of(out), state_dict_of(out / "final")) and not same(state_dict_of(out), final)
    # the copy is the root's own: a write in place there (save_model(output_dir) writes so) leaves final/ whole
    kept = state_dict_of(out / "final")
    (out / "model.safetensors").write_bytes(b"")
    assert same(state_dict_of(out / "final"), kept)


class Killed(BaseException):
    """The process dying at this point: nothing after it runs, no handler cleans up."""


@pytest.mark.parametrize("before", ["empty", "older_model"])
def test_a_final_save_killed_at_any_point_leaves_no_half_model_in_output_dir(tmp_path, monkeypatch, before):
    """The final model's files reach output_dir by renames; killed at each rename in turn, output_dir
    holds no model from_pretrained finds, or a whole one (the older one, or the new), never a mix.
    The older model has tied embeddings: its config over the new weights, or the reverse, would not load
    whole."""
    import os

    from epsdpo.staged import publish_files
    from epsdpo.trainer import MODEL_MARKERS

    trainer = Trainer(tiny_llama(0), config(tmp_path / "train", max_steps=1), toy_store(), tokenizer=word_tokenizer())
    trainer.train()
    final = tmp_path / "train" / "run" / "final"
    new = state_dict_of(final)
    older = tmp_path / "older"
    tiny_llama(7, tie=True).save_pretrained(older)
    old = state_dict_of(older)
    real_replace = os.replace
    seen = set()
    for kill_at in range(100):
        root = tmp_path / f"out{kill_at}"
        if before == "older_model":
            shutil.copytree(older, root)
        shutil.copytree(final, root / "final")
        calls = iter(range(1000))

        def dying_replace(src, dst, *args, kill_at=kill_at, **kwargs):
            if next(calls) == kill_at:
                raise Killed
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", dying_replace)
        try:
            publish_files(root / "final", root, MODEL_MARKERS)
            finished = True
        except Killed:
            finished = False
        monkeypatch.setattr(os, "replace", real_replace)
        found = state_dict_of(root)
        outcome = "none" if found is None else "new" if same(found, new) else "old" if same(found, old) else "mixed"
        assert outcome in ("none", "new"), (kill_at, outcome)  # the old one's config.json goes first
        seen.add(outcome)
        if finished:
            assert outcome == "new"
            break
    assert kill_at > 3 and seen == {"none", "new"}


def test_trainer_state_json_is_transformers_with_beta_beside_it(tmp_path):
    from transformers import TrainerState as HfTrainerState

    trainer = Trainer(tiny_llama(0), config(tmp_path, max_steps=4, save_steps=2, eval_steps=2,
                                            metric_for_best_model="rewards/accuracies"),
                      toy_store(), eval_dataset=toy_store(16, seed=5))
    trainer.train()
    out = tmp_path / "run"
    history = trainer.state.log_history
    evals = [r for r in history if "eval_loss" in r]
    best = max(evals, key=lambda r: r["eval_rewards/accuracies"])  # first of the best: a tie is no improvement
    for folder, step in ((out / "checkpoint-2", 2), (out / "checkpoint-4", 4), (out, 4)):
        state = HfTrainerState.load_from_json(str(folder / "trainer_state.json"))  # transformers' keys only
        assert (state.global_step, state.max_steps, state.epoch, state.num_train_epochs) == (step, 4, step / 8, 1)
        assert (state.logging_steps, state.eval_steps, state.save_steps, state.train_batch_size) == (1, 2, 2, 8)
        assert state.is_world_process_zero and state.is_local_process_zero
        # a checkpoint's history ends before the run's closing summary; the one at the end holds it all
        assert state.log_history == [r for r in history
                                     if r["step"] <= step and (folder == out or "train_runtime" not in r)]
        assert state.num_input_tokens_seen == [r for r in history if r["step"] == step][0]["num_tokens"]
        kept = [r for r in evals if r["step"] <= step]
        first_best = max(kept, key=lambda r: r["eval_rewards/accuracies"])
        assert state.best_metric == first_best["eval_rewards/accuracies"]
        assert state.best_global_step == first_best["step"]
    assert HfTrainerState.load_from_json(str(out / "trainer_state.json")).best_model_checkpoint == str(
        out / f"checkpoint-{best['step']}")
    assert len(HfTrainerState.load_from_json(str(out / "trainer_state.json")).log_history) == len(history)
    run_state = json.loads((out / "checkpoint-4" / "epsdpo_state.json").read_text())
    assert run_state["beta"] == trainer.kl.beta and run_state["global_step"] == 4 and "beta_rule" in run_state
    assert json.loads((out / "checkpoint-4" / MANIFEST).read_text())["files"].keys() >= {"epsdpo_state.json",
                                                                                     "trainer_state.json"}


def test_a_checkpoint_from_before_epsdpo_state_json_still_resumes(tmp_path):
    """Older checkpoints kept epsdpo's state inside trainer_state.json: they resume to the same run."""
    from epsdpo.checkpoint import _write_manifest

    full = Trainer(tiny_llama(0), config(tmp_path, max_steps=4, save_steps=2), toy_store())
    full.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    run_state = json.loads((checkpoint / "epsdpo_state.json").read_text())
    hf_state = json.loads((checkpoint / "trainer_state.json").read_text())
    old = {k: v for k, v in run_state.items() if k not in ("loss_sum", "loss_steps")}
    (checkpoint / "trainer_state.json").write_text(json.dumps({**old, "log_history": hf_state["log_history"]}))
    (checkpoint / "epsdpo_state.json").unlink()
    _write_manifest(checkpoint)
    resumed = Trainer(tiny_llama(0), config(tmp_path / "resumed", max_steps=4), toy_store())
    resumed.train(resume_from_checkpoint=checkpoint)
    torch.testing.assert_close(dict(resumed.model.named_parameters()), dict(full.model.named_parameters()),
                               rtol=0, atol=0)
    strip = lambda history: [{k: v for k, v in r.items() if k not in TIMINGS} for r in history]  # noqa: E731
    trained = lambda history: [r for r in history if "loss" in r]  # noqa: E731
    assert strip(trained(resumed.state.log_history)) != [] and [r["kl/beta"] for r in trained(
        resumed.state.log_history)] == [r["kl/beta"] for r in trained(full.state.log_history)]
    # its token count starts again at the resumed step: the old file did not keep it
    assert 0 < resumed.state.num_input_tokens_seen < full.state.num_input_tokens_seen
    assert resumed.state.epoch == full.state.epoch
