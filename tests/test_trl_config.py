"""A TRL user's DPO YAML runs unchanged but for the paths: the keys of TRL's CLI documentation
(`trl dpo --config dpo_config.yaml`) and the DPOConfig / ModelConfig / ScriptArguments /
TrainingArguments fields users put beside them, with TRL's meanings (the interval strategies among
them)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

import epsdpo.trainer
import epsdpo.methods.base as methods_base
from epsdpo.cli import RunArguments, main
from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from test_data import build_tokenizer
from tiny import tiny_llama, toy_store

# TRL's shape, values as a user writes them; only model_name_or_path and dataset_name are local paths
TRL_YAML = """\
model_name_or_path: {model}
model_revision: main
attn_implementation: eager
trust_remote_code: false
dataset_name: {data}
dataset_train_split: train
dataset_test_split: test
dataset_num_proc: 4
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
loss_type: sigmoid
label_smoothing: 0.0
max_length: 64
max_completion_length: 32
truncation_mode: keep_start
padding_free: false
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
    knobs = {"logging_steps": 1, **overrides}
    config = TrainConfig(output_dir=str(tmp_path / "run"), method="dpo", per_device_train_batch_size=8, max_steps=4,
                         max_length=32, progress=False, plots=True, **knobs)
    trainer = Trainer(tiny_llama(0), config, toy_store(24), eval_dataset=toy_store(8, seed=5))
    trainer.train()
    history = trainer.state.log_history
    return ([r["step"] for r in history if "loss" in r], [r["step"] for r in history if "eval_loss" in r],
            [int(c.name.split("-")[1]) for c in trainer.checkpoints()])


@pytest.mark.parametrize(("knobs", "logged", "evaluated", "saved"), [
    (dict(logging_steps=2, eval_strategy="steps", save_strategy="steps", save_steps=2), [2, 4], [2, 4], [2, 4]),
    # an explicit steps/epoch save_strategy also saves the last step, as transformers does
    (dict(logging_strategy="epoch", eval_strategy="epoch", save_strategy="epoch"), [3, 4], [3, 4], [3, 4]),
    (dict(logging_steps=3, save_strategy="steps", save_steps=3), [3, 4], [4], [3, 4]),
    (dict(logging_strategy="no", eval_strategy="no", eval_steps=1, save_strategy="no", save_steps=1), [], [], []),
    (dict(eval_steps=3, save_steps=3), [1, 2, 3, 4], [3, 4], [3]),  # no strategies: the steps alone decide
])
def test_interval_strategies_mean_what_they_mean_in_trl(tmp_path, knobs, logged, evaluated, saved):
    assert run_strategies(tmp_path, **knobs) == (logged, evaluated, saved)


# ------------------------------------------------------------- TRL's names keep TRL's meanings
def test_label_smoothing_is_only_accepted_as_trls_sigmoid_default():
    """TRL 1.16's sigmoid loss ignores label_smoothing; epsdpo's conservative-DPO term is cdpo_smoothing."""
    assert TrainConfig(label_smoothing=0.0).cdpo_smoothing == 0.0
    with pytest.raises(ValueError, match=r"^label_smoothing=0.1 is invalid: must be 0 \(TRL's sigmoid loss ignores "
                                         r"it\); for conservative DPO smoothing set cdpo_smoothing$"):
        TrainConfig(label_smoothing=0.1)


def test_cdpo_smoothing_reaches_the_loss(tmp_path, monkeypatch):
    seen = []
    real = methods_base.epsilon_dpo_loss

    def recording(*args):
        seen.append(args[5])
        return real(*args)

    monkeypatch.setattr(methods_base, "epsilon_dpo_loss", recording)
    config = TrainConfig(output_dir=str(tmp_path / "run"), cdpo_smoothing=0.2, max_steps=1, max_length=32,
                         progress=False, plots=False, report_to="none")
    Trainer(tiny_llama(0), config, toy_store(8)).train()
    assert seen == [0.2]


@pytest.mark.parametrize("loss_type", ["sigmoid", ["sigmoid"]])
def test_loss_type_sigmoid_is_accepted(loss_type):
    assert TrainConfig(loss_type=loss_type).loss_type == "sigmoid"


@pytest.mark.parametrize("loss_type", ["ipo", ["sigmoid", "sft"], "hinge"])
def test_other_loss_types_are_refused_naming_method(loss_type):
    with pytest.raises(ValueError, match=r"^loss_type=.* is invalid: must be 'sigmoid' .*method= \(dpo, epsilon_dpo"):
        TrainConfig(loss_type=loss_type)


def test_padding_free_is_the_packed_layout():
    assert TrainConfig(padding_free=True).layout == "packed"
    assert TrainConfig(padding_free=False, layout="shared_prompt").layout == "shared_prompt"
    with pytest.raises(ValueError, match=r"^padding_free=True is invalid: must be False with layout='shared_prompt'"):
        TrainConfig(padding_free=True, layout="shared_prompt")


def test_dataset_num_proc_is_accepted_and_checked():
    assert TrainConfig(dataset_num_proc=4).dataset_num_proc == 4
    with pytest.raises(ValueError, match=r"^dataset_num_proc=0 is invalid"):
        TrainConfig(dataset_num_proc=0)


def test_defaults_are_trls():
    """The defaults TRL 1.16's DPOConfig (and transformers' TrainingArguments) give the same names."""
    config = TrainConfig()
    assert (config.learning_rate, config.lr_scheduler_type, config.num_train_epochs, config.per_device_train_batch_size,
            config.per_device_eval_batch_size, config.logging_steps) == (1e-6, "linear", 3.0, 8, 8, 10)
    assert (config.beta, config.max_length, config.truncation_mode, config.loss_type, config.label_smoothing) == (
        0.1, 1024, "keep_start", "sigmoid", 0.0)
    assert (config.trust_remote_code, config.padding_free, config.disable_dropout, config.warmup_steps) == (
        False, False, True, 0.0)
    trl = pytest.importorskip("trl")
    ours = config.to_dict()
    # The differences the README's "Coming from TRL" table gives, each with its reason (output_dir has none)
    differ = {"bf16", "gradient_checkpointing", "eval_strategy", "save_strategy", "save_steps", "report_to",
              "pad_to_multiple_of", "fsdp", "loss_type", "output_dir", "optim",
              "model_revision", "dtype"}  # None: the default branch (TRL's main), float32 for a path (TRL's float32)
    for theirs in (dataclasses.asdict(trl.ModelConfig()), trl.DPOConfig(output_dir="unused", bf16=False).to_dict()):
        same = sorted(k for k in ours.keys() & theirs.keys() if k not in differ)
        assert len(same) >= 5 and {k: ours[k] for k in same} == {k: _plain(theirs[k]) for k in same}


def _plain(value):
    """An enum of TrainingArguments as the string it stands for."""
    return getattr(value, "value", value)


# ----------------------------------------------------------------------- loading the model as TRL does
@pytest.fixture
def loads(monkeypatch):
    """Every from_pretrained call's keyword arguments (the real loading still happens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = {"model": [], "tokenizer": []}
    for name, cls in (("model", AutoModelForCausalLM), ("tokenizer", AutoTokenizer)):
        real = cls.from_pretrained

        def recording(*args, _real=real, _name=name, **kwargs):
            calls[_name].append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    return calls


def test_model_config_fields_reach_from_pretrained(tmp_path, loads):
    model, data = model_and_data(tmp_path)
    config = TrainConfig(output_dir=str(tmp_path / "out"), attn_implementation="eager", model_revision="main",
                         trust_remote_code=True, max_length=64, progress=False)
    trainer = Trainer(str(model), config, str(data))
    assert trainer.model.config._attn_implementation == "eager"  # not switched to segment attention
    assert {k: loads["model"][0][k] for k in ("attn_implementation", "revision", "trust_remote_code")} == {
        "attn_implementation": "eager", "revision": "main", "trust_remote_code": True}
    assert {k: loads["tokenizer"][0][k] for k in ("revision", "trust_remote_code")} == {
        "revision": "main", "trust_remote_code": True}


def test_trust_remote_code_is_never_passed_unasked(tmp_path, loads):
    model, data = model_and_data(tmp_path)
    Trainer(str(model), TrainConfig(output_dir=str(tmp_path / "out"), max_length=64, progress=False), str(data))
    assert all("trust_remote_code" not in kwargs and "revision" not in kwargs
               for kwargs in loads["model"] + loads["tokenizer"])


def test_model_init_kwargs_pass_through_the_trainer(tmp_path, loads):
    """model_init_kwargs reach the policy and the reference, and win over the ModelConfig fields, as
    in TRL's dpo script."""
    model, data = model_and_data(tmp_path)
    config = TrainConfig(output_dir=str(tmp_path / "out"), model_init_kwargs={"attn_implementation": "eager"},
                         attn_implementation="sdpa", max_length=64, progress=False)
    trainer = Trainer(str(model), config, str(data), ref_model=str(model))
    assert [kwargs["attn_implementation"] for kwargs in loads["model"]] == ["eager", "eager"]
    assert trainer.model.config._attn_implementation == "eager"
    assert trainer.ref_model.config._attn_implementation == "eager"


# --------------------------------------------------------------------- TRL's dataset keys
class Recording:
    """Stands in for the Trainer: records what `epsdpo train` hands it."""

    calls: list[dict] = []

    def __init__(self, model, config, train_dataset, tokenizer=None, ref_model=None, eval_dataset=None):
        Recording.calls.append(dict(config=config, train_dataset=train_dataset, eval_dataset=eval_dataset))
        self.dist, self.state = SimpleNamespace(is_main=True), SimpleNamespace(global_step=0)
        self.kl = SimpleNamespace(beta=0.1)

    def train(self, resume_from_checkpoint=None):
        pass


@pytest.fixture
def recorded(monkeypatch):
    Recording.calls = []
    monkeypatch.setattr(epsdpo.trainer, "Trainer", Recording)
    return Recording.calls


def splits_folder(tmp_path):
    import datasets

    row = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    datasets.DatasetDict({"train": datasets.Dataset.from_list([row] * 6),
                          "test": datasets.Dataset.from_list([row] * 2)}).save_to_disk(tmp_path / "pairs")
    return tmp_path / "pairs"


@pytest.mark.parametrize(("eval_strategy", "eval_rows"), [("steps", 2), ("epoch", 2), ("no", None), (None, None)])
def test_dataset_splits_as_trls_dpo_script(tmp_path, recorded, eval_strategy, eval_rows):
    """dataset_train_split trains; dataset_test_split evaluates unless eval_strategy is no (TRL's default)."""
    folder = splits_folder(tmp_path)
    yaml = f"model_name_or_path: m\ndataset_name: {folder}\ndataset_train_split: train\ndataset_test_split: test\n"
    if eval_strategy is not None:
        yaml += f"eval_strategy: {eval_strategy}\n"
    (tmp_path / "c.yaml").write_text(yaml)
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    call = recorded[-1]
    assert call["train_dataset"].num_rows == 6
    assert (None if call["eval_dataset"] is None else call["eval_dataset"].num_rows) == eval_rows


def test_a_test_split_of_one_file_is_a_usage_error(tmp_path, recorded, capsys):
    (tmp_path / "pairs.jsonl").write_text("")
    (tmp_path / "c.yaml").write_text(f"model: m\ntrain_data: {tmp_path / 'pairs.jsonl'}\ndataset_test_split: test\n"
                                     "eval_strategy: steps\n")
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(tmp_path / "c.yaml")])
    assert exit_.value.code == 2
    assert "dataset_test_split='test' is invalid: the training data" in capsys.readouterr().err


def test_dataset_train_split_is_train_split():
    assert RunArguments(train_data="d", dataset_train_split="test").train_split == "test"
    with pytest.raises(ValueError, match="dataset_train_split='b' is invalid: must be unset when train_split is set"):
        RunArguments(train_split="a", dataset_train_split="b")


def test_dataset_config_reaches_load_dataset(tmp_path, recorded, monkeypatch):
    import datasets

    from epsdpo import hub

    seen = []

    def load_dataset(name, config=None, split=None):
        seen.append((name, config, split))
        return datasets.Dataset.from_list([{"prompt": "Q?", "chosen": "yes", "rejected": "no"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: True)
    (tmp_path / "c.yaml").write_text("model: m\ndataset_name: org/pairs\ndataset_config: en\n"
                                     "dataset_train_split: train\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    assert seen == [("org/pairs", "en", "train")]


def folder_without_test_split(tmp_path, splits: bool):
    import datasets

    rows = datasets.Dataset.from_list([{"prompt": "Q?", "chosen": "yes", "rejected": "no"}] * 4)
    (datasets.DatasetDict({"train": rows, "validation": rows}) if splits else rows).save_to_disk(tmp_path / "pairs")
    return tmp_path / "pairs"


@pytest.mark.parametrize("asks", ["eval_strategy: steps\n", "eval_strategy: epoch\n", "eval_steps: 2\n"])
def test_dataset_test_split_defaults_to_test_as_in_trl(tmp_path, recorded, asks):
    """TRL's dpo script evaluates on dataset_test_split, `test` unless set; a TRL YAML asking for
    evaluation without naming the split evaluates on the test split instead of never."""
    folder = splits_folder(tmp_path)
    (tmp_path / "c.yaml").write_text(f"model_name_or_path: m\ndataset_name: {folder}\n{asks}")
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    # the folder trains on its train split (the loader's default), and evaluates on its test split
    assert recorded[-1]["train_dataset"] == str(folder) and recorded[-1]["eval_dataset"].num_rows == 2


@pytest.mark.parametrize(("splits", "listed"), [(True, "its splits: train, validation"), (False, "it has no splits")])
def test_evaluation_without_a_test_split_is_refused(tmp_path, recorded, splits, listed):
    folder = folder_without_test_split(tmp_path, splits)
    (tmp_path / "c.yaml").write_text(f"model: m\ntrain_data: {folder}\ntrain_split: train\neval_strategy: steps\n"
                                     if splits else f"model: m\ntrain_data: {folder}\neval_strategy: steps\n")
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(tmp_path / "c.yaml")])
    assert str(exit_.value) == (f"epsdpo train: dataset_test_split='test': the training dataset {folder} has no split "
                                f"'test' ({listed}) to evaluate on; set eval_data or dataset_test_split, or "
                                "eval_strategy: no")
    assert recorded == []


def test_evaluation_of_one_training_file_without_eval_data_is_a_usage_error(tmp_path, recorded, capsys):
    (tmp_path / "pairs.jsonl").write_text("")
    (tmp_path / "c.yaml").write_text(f"model: m\ntrain_data: {tmp_path / 'pairs.jsonl'}\neval_strategy: steps\n")
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(tmp_path / "c.yaml")])
    assert exit_.value.code == 2
    assert ("eval_strategy='steps' asks for evaluation, but there is no eval data: the training data "
            f"{tmp_path / 'pairs.jsonl'} is one file, without a 'test' split") in capsys.readouterr().err
    assert recorded == []
