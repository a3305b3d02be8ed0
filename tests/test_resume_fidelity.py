"""A resumed run is the run its checkpoint belongs to: any training setting that differs from the
checkpoint's is refused with a diff of the fields (epsdpo.run_identity), unless resume_allow_changes
lets it change, and then it is what trains from the checkpoint's step on and what is recorded."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import get_scheduler

import epsdpo
from epsdpo.checkpoint import RUN_STATE, CheckpointError, _load_training_state, _write_manifest
from epsdpo.config import TrainConfig
from epsdpo.run_identity import UnverifiedResumeWarning
from epsdpo.trainer import Trainer
from tiny import VOCAB, tiny_llama, toy_store


def config(out, **overrides) -> TrainConfig:
    base = dict(output_dir=str(out), method="epsilon_dpo", beta=0.1, epsilon=0.01, learning_rate=3e-3,
                per_device_train_batch_size=8, max_steps=4, lr_scheduler_type="linear", max_length=32,
                max_prompt_length=16, progress=False, plots=False, seed=3, save_steps=2, report_to="none",
                logging_steps=1)
    base.update(overrides)
    return TrainConfig(**base)


def tokenizer(extra: str = ""):
    """A word-level fast tokenizer of VOCAB words; `extra` renames one of them (another tokenizer)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", *(f"w{i}" for i in range(2, VOCAB))]
    if extra:
        words[-1] = extra
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def same_lengths_other_tokens() -> epsdpo.PreferenceStore:
    """toy_store with one token of one chosen answer replaced: every length (so the sampler's
    fingerprint) is the same, the data is not."""
    original, store = toy_store(), epsdpo.PreferenceStore(vocab_size=VOCAB)
    for index in range(len(original)):
        prompt, chosen, rejected = (part.tolist() for part in original[index])
        if index == 5:
            chosen[0] = 2 if chosen[0] != 2 else 3
        store.add_pair(prompt, chosen, rejected)
    return store


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """checkpoint-2 of an ε-DPO run (ε = 0.01, linear schedule, a tokenizer) and of a DPO run."""
    root = tmp_path_factory.mktemp("runs")
    Trainer(tiny_llama(0), config(root / "eps"), toy_store(), tokenizer=tokenizer()).train()
    Trainer(tiny_llama(0), config(root / "dpo", method="dpo", max_steps=2), toy_store(), tokenizer=tokenizer()).train()
    return {"eps": root / "eps" / "checkpoint-2", "dpo": root / "dpo" / "checkpoint-2"}


def resume(checkpoint, out, data=None, tok=None, **overrides) -> Trainer:
    trainer = Trainer(tiny_llama(0), config(out, **overrides), data or toy_store(), tokenizer=tok or tokenizer())
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


# Each: the checkpoint, this run's settings, what the refusal must list (field: checkpoint → this run)
REFUSED = [
    pytest.param("dpo", dict(method="epsilon_dpo", epsilon=0.2, max_steps=2),
                 ["method: 'dpo' → 'epsilon_dpo'", "epsilon (ε_s of the β update; 0 unless method=epsilon_dpo): "
                  "0.0 → 0.2", "epsilon_check (ε_c of each pair's step; 0 unless method=epsilon_dpo): 0.0 → 0.2",
                  "cannot change on resume"], id="dpo-resumed-as-epsilon-dpo"),
    pytest.param("eps", dict(epsilon=0.2), ["epsilon (ε_s", "0.01 → 0.2"], id="epsilon-changed"),
    pytest.param("eps", dict(epsilon_check=0.2), ["epsilon_check (ε_c", "0.01 → 0.2"], id="epsilon-check-changed"),
    pytest.param("eps", dict(beta=0.2), ["beta: 0.1 → 0.2"], id="beta-changed"),
    pytest.param("eps", dict(method="dpo"), ["method: 'epsilon_dpo' → 'dpo'"], id="epsilon-dpo-resumed-as-dpo"),
    pytest.param("eps", dict(learning_rate=1e-3), ["learning_rate: 0.003 → 0.001", "list it in resume_allow_changes"],
                 id="learning-rate-changed"),
    pytest.param("eps", dict(lr_scheduler_type="cosine"), ["lr_scheduler_type: 'linear' → 'cosine'"], id="schedule"),
    pytest.param("eps", dict(max_steps=6), ["max_steps (the schedule's total optimizer steps, from max_steps or "
                                            "num_train_epochs): 4 → 6"], id="total-steps-of-a-decaying-schedule"),
    pytest.param("eps", dict(warmup_steps=1), ["warmup_steps (warm-up optimizer steps, from warmup_steps or "
                                               "warmup_ratio): 0 → 1"], id="warmup"),
    pytest.param("eps", dict(per_device_train_batch_size=4), ["per_device_train_batch_size: 8 → 4"], id="batch"),
    pytest.param("eps", dict(gradient_accumulation_steps=2), ["gradient_accumulation_steps: 1 → 2"], id="accumulation"),
    pytest.param("eps", dict(layout="packed"), ["layout: 'padded' → 'packed'"], id="layout"),
    pytest.param("eps", dict(max_length=24), ["max_length: 32 → 24"], id="max-length"),
    pytest.param("eps", dict(seed=4), ["seed: 3 → 4"], id="seed"),
    pytest.param("eps", dict(cdpo_smoothing=0.1), ["cdpo_smoothing: 0.0 → 0.1"], id="loss-smoothing"),
    pytest.param("eps", dict(data="other"), ["train_data (fingerprint of the tokenized training pairs)"],
                 id="other-data-same-lengths"),
    pytest.param("eps", dict(tok="other"), ["tokenizer (fingerprint of the tokenizer)"], id="other-tokenizer"),
]


@pytest.mark.parametrize(("which", "changes", "listed"), REFUSED)
def test_a_changed_training_setting_is_refused_with_a_diff(runs, tmp_path, which, changes, listed):
    changes = dict(changes)
    data = same_lengths_other_tokens() if changes.pop("data", None) else None
    tok = tokenizer("renamed") if changes.pop("tok", None) else None
    with pytest.raises(CheckpointError) as refused:
        resume(runs[which], tmp_path / "resumed", data=data, tok=tok, **changes)
    message = str(refused.value)
    assert message.startswith(f"{runs[which]} was written by a run with other settings than this one (")
    for part in listed:
        assert part in message
    assert "\n" not in message
    assert not (tmp_path / "resumed").exists()  # refused before anything was loaded or written


def test_tr_dpo_resuming_a_dpo_checkpoint_names_the_missing_moved_reference(runs, tmp_path):
    with pytest.raises(CheckpointError, match=r"method: 'dpo' → 'tr_dpo'.*holds no moved reference "
                                              r"\(reference\.safetensors\).*cannot change on resume"):
        resume(runs["dpo"], tmp_path / "resumed", method="tr_dpo", max_steps=2)


def test_a_moving_reference_without_its_file_is_named(runs, tmp_path, monkeypatch):
    """Past the settings check (here forced to pass), the missing reference.safetensors is named
    with the reason, not a bare FileNotFoundError."""
    import epsdpo.run_checkpoints as run_checkpoints

    monkeypatch.setattr(run_checkpoints, "_check_identity", lambda *args: {})
    with pytest.raises(CheckpointError, match=r"holds no reference\.safetensors: this run's reference moves toward "
                                              r"the policy \(method='tr_dpo'"):
        resume(runs["dpo"], tmp_path / "resumed", method="tr_dpo", max_steps=2)


def test_free_settings_change_without_a_word(runs, tmp_path):
    trainer = resume(runs["eps"], tmp_path / "resumed", logging_steps=2, save_steps=1, save_total_limit=1,
                     eval_steps=None, report_to="jsonl", run_name="again", chunk_size=64, ddp_timeout=60,
                     max_row_bytes=10**7)  # the rows it keeps are the data's fingerprint, compared anyway
    assert trainer.state.global_step == 4 and trainer.resumes[-1]["changed"] == {}


def test_a_moved_chat_template_resumes_and_another_template_is_refused(tmp_path):
    """chat_template_path is a path, free to change; the template it names is part of the tokenizer's
    fingerprint, which is compared."""
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    first, moved, other = (tmp_path / f"{name}.jinja" for name in ("first", "moved", "other"))
    first.write_text(template)
    moved.write_text(template)
    other.write_text(template + "!")
    Trainer(tiny_llama(0), config(tmp_path / "run", chat_template_path=str(first)), toy_store(),
            tokenizer=tokenizer()).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert resume(checkpoint, tmp_path / "moved", chat_template_path=str(moved)).state.global_step == 4
    with pytest.raises(CheckpointError, match=r"tokenizer \(fingerprint of the tokenizer\)"):
        resume(checkpoint, tmp_path / "other", chat_template_path=str(other))


def test_total_steps_may_change_under_a_constant_schedule(tmp_path):
    Trainer(tiny_llama(0), config(tmp_path / "run", lr_scheduler_type="constant"), toy_store(),
            tokenizer=tokenizer()).train()
    # transformers' constant schedule has no warm-up, so a warm-up setting changes nothing either
    trainer = resume(tmp_path / "run" / "checkpoint-2", tmp_path / "resumed", lr_scheduler_type="constant", max_steps=6,
                     warmup_ratio=0.5)
    assert trainer.state.global_step == 6
    assert set(learning_rates(trainer).values()) == {3e-3}
    assert "| learning rate | 0.003, constant schedule, 0 warm-up steps |" in (
        tmp_path / "resumed" / "final" / "README.md").read_text()


def learning_rates(trainer) -> dict[int, float]:
    return {r["step"]: r["learning_rate"] for r in trainer.state.log_history if "learning_rate" in r}


def test_an_allowed_change_is_what_trains_and_what_is_recorded(runs, tmp_path):
    out = tmp_path / "resumed"
    trainer = resume(runs["eps"], out, learning_rate=1e-3, max_steps=6, weight_decay=0.1,
                     resume_allow_changes=["learning_rate", "max_steps", "weight_decay"])
    rates = learning_rates(trainer)
    # steps 1-2 ran before the checkpoint (3e-3, linear over 4 steps); from step 3 on: 1e-3, linear over 6
    assert rates[1] == pytest.approx(3e-3) and rates[2] == pytest.approx(3e-3 * 3 / 4)
    for step in (3, 4, 5, 6):
        assert rates[step] == pytest.approx(1e-3 * (6 - step + 1) / 6), step
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.1, 0.0]
    change = {"learning_rate": [0.003, 0.001], "max_steps": [4, 6], "weight_decay": [0.0, 0.1]}
    assert trainer.resumes == [{"step": 2, "checkpoint": "checkpoint-2", "changed": change}]
    saved = json.loads((out / "checkpoint-6" / RUN_STATE).read_text())
    assert saved["resumes"] == trainer.resumes
    assert json.loads((out / "checkpoint-6" / "training_config.json").read_text())["learning_rate"] == 1e-3
    card = (out / "final" / "README.md").read_text()
    resumed_row = next(line for line in card.splitlines() if line.startswith("| resumed | at step 2 from checkpoint-2, "))
    for part in ("learning_rate 0.003 → 0.001", "max_steps 4 → 6", "weight_decay 0.0 → 0.1", "from then on"):
        assert part in resumed_row
    assert "| learning rate | 0.001, linear schedule" in card


def test_a_changed_schedule_shape_and_adam_epsilon_train_when_listed(runs, tmp_path):
    """lr_scheduler_kwargs and adam_epsilon change like their twins lr_scheduler_type and the Adam betas:
    refused unless listed; listed, the schedule continues with the new kwargs and the restored
    optimizer takes the new ε (the checkpoint's optimizer state holds the old one)."""
    changes = dict(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-3}, adam_epsilon=1e-6)
    with pytest.raises(CheckpointError, match="adam_epsilon: 1e-08 → 1e-06") as refused:
        resume(runs["eps"], tmp_path / "refused", **changes)
    assert "lr_scheduler_kwargs: None → {'min_lr': 0.001}" in str(refused.value)
    trainer = resume(runs["eps"], tmp_path / "resumed", **changes,
                     resume_allow_changes=["lr_scheduler_type", "lr_scheduler_kwargs", "adam_epsilon"])
    assert [g["eps"] for g in trainer.optimizer.param_groups] == [1e-6, 1e-6]
    # the oracle: transformers' own schedule of the new shape over the run's 4 steps, from step 2 on
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3)
    schedule = get_scheduler("cosine_with_min_lr", probe, num_warmup_steps=0, num_training_steps=4,
                             scheduler_specific_kwargs={"min_lr": 1e-3})
    expected = []
    for _ in range(4):
        expected.append(probe.param_groups[0]["lr"])
        probe.step(), schedule.step()
    rates = learning_rates(trainer)
    assert [rates[step] for step in (3, 4)] == pytest.approx(expected[2:])


def test_an_unchanged_resume_continues_exactly_and_keeps_the_resume_on_record(runs, tmp_path):
    full = Trainer(tiny_llama(0), config(tmp_path / "full"), toy_store(), tokenizer=tokenizer())
    full.train()
    resumed = resume(runs["eps"], tmp_path / "resumed")
    np.testing.assert_array_equal(resumed.kl.beta_history(), full.kl.beta_history())
    assert learning_rates(resumed) == learning_rates(full)
    assert "| resumed | at step 2 from checkpoint-2, settings unchanged |" in (
        tmp_path / "resumed" / "final" / "README.md").read_text()


@pytest.mark.parametrize(("names", "why"), [
    (["beta"], "'beta' is fixed by the checkpoint"),
    (["epsilon"], "'epsilon' is fixed by the checkpoint"),
    (["train_data"], "'train_data' is fixed by the checkpoint"),
    (["logging_steps"], "'logging_steps' is always free to change on resume"),
    (["learning_rate", "nonsense"], "'nonsense' is fixed by the checkpoint"),
])
def test_resume_allow_changes_lists_only_changeable_settings(names, why):
    with pytest.raises(ValueError, match=rf"^resume_allow_changes=.* is invalid: {why}; it may list max_steps"):
        TrainConfig(resume_allow_changes=names)


def test_one_name_as_a_yaml_scalar_is_a_list_of_one():
    assert TrainConfig(resume_allow_changes="num_train_epochs").resume_allow_changes == ["num_train_epochs"]


def predating(checkpoint, tmp_path):
    """The checkpoint as a version without recorded identities wrote it."""
    copy = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, copy)
    state = json.loads((copy / RUN_STATE).read_text())
    del state["run_identity"], state["resumes"]
    (copy / RUN_STATE).write_text(json.dumps(state))
    (copy / "manifest.json").unlink()
    _write_manifest(copy)
    return copy


def test_an_older_checkpoint_is_compared_on_its_config_and_warns_about_the_data(runs, tmp_path):
    old = predating(runs["eps"], tmp_path)
    with pytest.raises(CheckpointError, match=r"epsilon \(ε_s.*\): 0\.01 → 0\.2"):
        resume(old, tmp_path / "refused", epsilon=0.2)
    with pytest.warns(UnverifiedResumeWarning, match="its data and tokenizer are not"):
        trainer = resume(old, tmp_path / "resumed", data=same_lengths_other_tokens())
    assert trainer.state.global_step == 4


def test_a_missing_training_state_is_named_missing(runs, tmp_path):
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(runs["eps"], copy)
    (copy / "training_state.pt").unlink()
    (copy / "manifest.json").unlink()
    _write_manifest(copy)  # as if the manifest never listed it
    # the manifest check names it first; the loader, reached without one, names it too
    with pytest.raises(CheckpointError, match=r"does not list training_state\.pt, which resuming reads"):
        resume(copy, tmp_path / "resumed")
    with pytest.raises(CheckpointError, match=r"training_state\.pt is missing: the checkpoint has no optimizer"):
        _load_training_state(copy)
