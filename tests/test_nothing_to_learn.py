"""Runs that would log steps while learning nothing: pairs whose chosen and rejected are the same
tokens after truncation (dropped, counted, an error when none is left)."""

from __future__ import annotations

import pytest

import epsdpo
from epsdpo.config import TrainConfig
from epsdpo.data import compute_stats
from epsdpo.trainer import Trainer
from tiny import VOCAB, tiny_llama, toy_store


def config(out, **overrides) -> TrainConfig:
    base = dict(output_dir=str(out), beta=0.1, epsilon=0.1, learning_rate=3e-3, per_device_train_batch_size=4,
                max_steps=3, warmup_ratio=0.0, lr_scheduler_type="constant", max_length=32, max_prompt_length=16,
                progress=False, plots=False, seed=3, logging_steps=1, report_to="none")
    base.update(overrides)
    return TrainConfig(**base)


def store_of(pairs) -> epsdpo.PreferenceStore:
    store = epsdpo.PreferenceStore(vocab_size=VOCAB)
    for prompt, chosen, rejected in pairs:
        store.add_pair(prompt, chosen, rejected)
    return store


# Identical only once completions are cut to 2 tokens; identical as stored; identical once max_length
# leaves the completion 2 tokens after an 8-token prompt (max_length 10).
SAME_AFTER_CUT = ([5, 6, 7], [9, 10, 11, 12], [9, 10, 13])
SAME_AS_STORED = ([5, 6], [20, 21, 1], [20, 21, 1])


# ------------------------------------------------------------------------ pairs with nothing to learn
@pytest.mark.parametrize("pairs, limits", [
    ([SAME_AS_STORED] * 4, {}),
    ([SAME_AFTER_CUT] * 3 + [SAME_AS_STORED], {"max_completion_length": 2}),
    ([([2, 3, 4, 5, 6, 7, 8, 9], [30, 31, 32], [30, 31, 33])] * 4, {"max_length": 10, "max_prompt_length": None}),
    ([SAME_AS_STORED] * 2 + [([2] * 40, [3], [4])] * 2, {"skip_invalid": True, "max_prompt_length": None}),  # the rest emptied
], ids=["identical as stored", "identical after max_completion_length", "identical after max_length",
        "identical or emptied"])
def test_a_dataset_with_no_pair_left_to_learn_from_is_an_error(tmp_path, pairs, limits):
    with pytest.raises(ValueError, match=r"no pair can be trained on: \d+ of the train data's 4 pairs have the same "
                                         r"chosen and rejected tokens after truncation .*\(first: pair 0\)"):
        Trainer(tiny_llama(0), config(tmp_path / "run", **limits), store_of(pairs))


def test_an_eval_dataset_with_no_pair_left_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no pair can be evaluated on: 2 of the eval data's 2 pairs"):
        Trainer(tiny_llama(0), config(tmp_path / "run"), toy_store(16), eval_dataset=store_of([SAME_AS_STORED] * 2))


def test_identical_pairs_are_counted_warned_about_and_never_fed(tmp_path):
    train = toy_store(16)
    start = len(train)
    for pair in (SAME_AFTER_CUT, SAME_AS_STORED, SAME_AFTER_CUT):
        train.add_pair(*pair)
    identical = {start, start + 1, start + 2}
    evaluation = store_of([SAME_AS_STORED, ([5, 6], [7, 1], [8, 1])])
    with pytest.warns(UserWarning) as caught:
        trainer = Trainer(tiny_llama(0), config(tmp_path / "run", max_completion_length=2, max_steps=6), train,
                          eval_dataset=evaluation)
    said = [str(w.message) for w in caught if "same chosen and rejected" in str(w.message)]
    assert said == [
        f"train data: 3 of {start + 3} pairs have the same chosen and rejected tokens after truncation to max_length=32, "
        f"max_prompt_length=16, max_completion_length=2 (first: pair {start}); they are dropped, having nothing to learn",
        "eval data: 1 of 2 pairs have the same chosen and rejected tokens after truncation to max_length=32, "
        "max_prompt_length=16, max_completion_length=2 (first: pair 0); they are dropped, having nothing to learn",
    ]
    fed: dict[bool, list[int]] = {True: [], False: []}
    real = trainer._micro_batch

    def recording(batch, sums, *, train):
        fed[train].extend(batch["pair_indices"].tolist())
        return real(batch, sums, train=train)

    trainer._micro_batch = recording
    trainer.train()  # 6 steps of 4 pairs: every one of the 19 pairs offered at least once
    trainer.evaluate()
    assert set(fed[True]) == set(range(start)), "an identical pair was trained on, or another pair was not"
    assert set(fed[False]) == {1}, "the identical eval pair was scored"


def test_the_data_report_counts_identical_pairs_after_truncation():
    store = store_of([SAME_AFTER_CUT, SAME_AS_STORED, ([5], [7, 8], [9])])
    assert compute_stats(store).identical_after_truncation == 1
    report = compute_stats(store, max_completion_length=2)
    assert report.identical_after_truncation == 2
    assert "chosen identical to rejected (dropped): 2" in str(report)
    lengths = epsdpo.Collator(max_completion_length=2).truncated_lengths(store)
    assert lengths["identical"].tolist() == [0, 1]
