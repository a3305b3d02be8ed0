"""epsdpo's `method: dpo` and `method: ipo` train as TRL 1.16's `DPOTrainer` with `loss_type: sigmoid`
and `loss_type: ipo` do, step for step: the same tiny model fed the same pairs in the same order
logs the same loss and reward metrics at every step and holds the same weights after three steps,
in every batch layout (the layouts change how the pairs are laid out, never what is computed)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from epsdpo.config import LAYOUTS, TrainConfig
from epsdpo.trainer import Trainer
from tiny import tiny_llama, toy_store

trl = pytest.importorskip("trl")

STEPS, PAIRS_PER_STEP = 3, 4
# What TRL logs per step that epsdpo logs under the same name
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "grad_norm")
TRL_LOSS = {"dpo": "sigmoid", "ipo": "ipo"}
COMMON = dict(beta=0.1, learning_rate=1e-2, per_device_train_batch_size=PAIRS_PER_STEP, max_steps=STEPS,
              lr_scheduler_type="constant", warmup_steps=0, max_length=64, seed=0)


def store():
    return toy_store(n=PAIRS_PER_STEP * STEPS, seed=1)


def train_epsdpo(tmp_path, method: str, layout: str) -> tuple[list[dict], dict, list[int]]:
    config = TrainConfig(output_dir=str(tmp_path / layout), method=method, loss_type=TRL_LOSS[method], layout=layout,
                         logging_steps=1, progress=False, plots=False, report_to="none", **COMMON)
    trainer = Trainer(tiny_llama(0), config, store())
    order = [int(i) for batch in trainer.sampler.epoch_batches(0)[:STEPS] for i in batch]
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    return records, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, order


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2}  # the toy pairs use neither 0 nor 2: TRL pads with 0
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                   pad_token="<pad>", eos_token="<s>", unk_token="<unk>")


def train_trl(loss_type: str, order: tuple[int, ...], workdir: str) -> tuple[list[dict], dict]:
    """TRL's DPOTrainer on the pairs of `order`, read in that order (TRL's tokenization is skipped:
    the rows are already token ids, as epsdpo's store holds them)."""
    from datasets import Dataset

    pairs = store()
    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for i in order:
        for key, ids in zip(rows, pairs[i]):
            rows[key].append(ids.tolist())

    class PreTokenized(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    model = tiny_llama(0)
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    args = trl.DPOConfig(output_dir=workdir, loss_type=loss_type, logging_steps=1, save_strategy="no",
                         report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
                         train_sampling_strategy="sequential", optim="adamw_torch", bf16=False, **COMMON)
    trainer = PreTokenized(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_dict(rows),
                           processing_class=_tokenizer())
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    return records, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def trl_runs(tmp_path_factory):
    """TRL's run of each (loss_type, order), once: the layouts share it."""
    runs: dict[tuple, tuple[list[dict], dict]] = {}

    def run(loss_type: str, order: list[int]) -> tuple[list[dict], dict]:
        key = (loss_type, tuple(order))
        if key not in runs:
            runs[key] = train_trl(loss_type, key[1], str(tmp_path_factory.mktemp("trl")))
        return runs[key]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", ["dpo", "ipo"])
def test_each_step_equals_trls_dpo_trainer(tmp_path, trl_runs, method, layout):
    ours, our_weights, order = train_epsdpo(tmp_path, method, layout)
    theirs, their_weights = trl_runs(TRL_LOSS[method], order)
    assert len(ours) == len(theirs) == STEPS
    for step, (mine, trls) in enumerate(zip(ours, theirs), start=1):
        for key in METRICS:
            assert mine[key] == pytest.approx(trls[key], rel=1e-4, abs=1e-5), f"step {step}: {key}"
    assert our_weights.keys() == their_weights.keys()
    for name, weight in our_weights.items():
        # Adam divides by √v: where a gradient is ~0 float32 rounding moves a weight by up to ~1e-5
        torch.testing.assert_close(weight, their_weights[name], rtol=1e-4, atol=5e-5, msg=f"weight {name}")
    start = tiny_llama(0).state_dict()
    moved = max((their_weights[k] - start[k]).abs().max().item() for k in their_weights)
    assert moved > 1e-2  # three steps moved the weights 200 times the tolerance: the check can tell


def test_ipo_is_not_dpo(tmp_path):
    """The two losses differ on the same pairs, so the test above tells them apart."""
    dpo, _, _ = train_epsdpo(tmp_path / "dpo", "dpo", "padded")
    ipo, _, _ = train_epsdpo(tmp_path / "ipo", "ipo", "padded")
    assert abs(dpo[0]["loss"] - ipo[0]["loss"]) > 1e-2
    # the reward metrics are TRL's for both: β times the summed log-ratios, the same at step 1
    np.testing.assert_allclose(dpo[0]["rewards/margins"], ipo[0]["rewards/margins"], rtol=1e-6)
