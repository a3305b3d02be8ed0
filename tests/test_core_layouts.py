"""The Rust collator against the pure-Python oracle, array for array, on random stores."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import epsdpo
from layout_oracle import collate as oracle_collate
from layout_oracle import truncate as oracle_truncate

LAYOUTS = ["padded", "packed", "shared_prompt"]
ARRAYS = [
    "input_ids", "attention_mask", "position_ids", "completion_mask", "sequence_index",
    "segment_ids", "branch_ids", "logit_index", "target_ids", "target_sequence", "sequence_lengths",
]

span = lambda n: st.lists(st.integers(0, 999), min_size=1, max_size=n)  # noqa: E731
pairs_st = st.lists(st.tuples(span(10), span(14), span(14)), min_size=1, max_size=10)


def make_store(pairs):
    store = epsdpo.PreferenceStore(vocab_size=1000)
    for p, c, r in pairs:
        store.add_pair(p, c, r)
    return store


@settings(max_examples=150, deadline=None)
@given(
    pairs=pairs_st,
    layout=st.sampled_from(LAYOUTS),
    max_length=st.none() | st.integers(6, 30),
    max_prompt_length=st.none() | st.integers(1, 5),
    max_completion_length=st.none() | st.integers(1, 16),
    mode=st.sampled_from(["keep_end", "keep_start"]),
    multiple=st.integers(1, 4),
    data=st.data(),
)
def test_layouts_match_the_oracle(pairs, layout, max_length, max_prompt_length, max_completion_length, mode, multiple,
                                  data):
    store = make_store(pairs)
    truncated = [oracle_truncate(*p, max_length, max_prompt_length, mode, max_completion_length) for p in pairs]
    # Pairs emptied by truncation fail or are skipped; pairs left identical are always dropped
    survivors = [i for i, t in enumerate(truncated) if t is not None and t[1] != t[2]]
    if not survivors:
        return
    indices = data.draw(st.lists(st.sampled_from(survivors), min_size=1, max_size=8))
    collator = epsdpo.Collator(
        layout, max_length=max_length, max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length, prompt_truncation_mode=mode, pad_token_id=5,
        pad_to_multiple_of=multiple,
    )
    got = collator(store, np.array(indices, dtype=np.int64))
    want = oracle_collate([pairs[i] for i in indices], layout, max_length, max_prompt_length, mode, pad=5, multiple=multiple,
                          max_completion_length=max_completion_length)
    for key in ARRAYS:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got[key].dtype == want[key].dtype, key
    assert got["num_sequences"] == 2 * len(indices)
    np.testing.assert_array_equal(got["pair_indices"], indices)


@settings(max_examples=60, deadline=None)
@given(pairs=pairs_st, max_length=st.none() | st.integers(6, 30), max_prompt_length=st.none() | st.integers(1, 5),
       max_completion_length=st.none() | st.integers(1, 16))
def test_truncated_lengths_match_the_oracle(pairs, max_length, max_prompt_length, max_completion_length):
    store = make_store(pairs)
    lengths = epsdpo.Collator(max_length=max_length, max_prompt_length=max_prompt_length,
                              max_completion_length=max_completion_length).truncated_lengths(store)
    empty, identical = [], []
    for i, p in enumerate(pairs):
        t = oracle_truncate(*p, max_length, max_prompt_length, max_completion_length=max_completion_length)
        if t is None:
            empty.append(i)
            continue
        if t[1] == t[2]:
            identical.append(i)
        assert (lengths["prompt"][i], lengths["chosen"][i], lengths["rejected"][i]) == tuple(map(len, t))
    assert lengths["empty"].tolist() == empty
    assert lengths["identical"].tolist() == identical


def test_emptied_completion_raises_or_is_skipped():
    store = make_store([([1, 2, 3, 4], [5], [6]), ([1], [2], [3])])
    with pytest.raises(epsdpo.TruncationError) as info:
        epsdpo.Collator(max_length=4)(store, [1, 0])
    assert info.value.pair_index == 0 and isinstance(info.value, ValueError)
    batch = epsdpo.Collator(max_length=4, skip_empty=True)(store, [1, 0])
    assert batch["pair_indices"].tolist() == [1] and batch["skipped"].tolist() == [0]


def test_arrays_hand_to_torch_without_a_copy():
    torch = pytest.importorskip("torch")
    store = make_store([([1, 2], [3, 4], [5])])
    batch = epsdpo.Collator("packed")(store, [0])
    ids = batch["input_ids"]
    tensor = torch.from_numpy(ids)
    ids[0, 0] = 42
    assert tensor[0, 0].item() == 42


def test_bad_collator_settings_are_rejected():
    with pytest.raises(ValueError, match="layout"):
        epsdpo.Collator("ragged")
    with pytest.raises(epsdpo.ConfigError, match="max_prompt_length"):
        epsdpo.Collator(max_length=8, max_prompt_length=8)
    with pytest.raises(epsdpo.ConfigError, match="max_completion_length"):
        epsdpo.Collator(max_completion_length=0)
    with pytest.raises(epsdpo.ConfigError):
        epsdpo.Collator(pad_to_multiple_of=0)
    store = make_store([([1], [2], [3])])
    with pytest.raises(epsdpo.InvalidPairError) as info:
        epsdpo.Collator()(store, [0, 3])
    assert info.value.pair_index == 3


def test_train_config_max_completion_length_reaches_the_collator():
    from epsdpo.config import TrainConfig
    from epsdpo.feed import make_collator

    store = make_store([([1, 2], [3, 4, 5, 6], [7]), ([1], [2, 3, 4], [5, 6, 7, 8, 9])])
    lengths = make_collator(TrainConfig(max_completion_length=2), None).truncated_lengths(store)
    assert lengths["chosen"].tolist() == [2, 2] and lengths["rejected"].tolist() == [1, 2]


def test_the_prompt_cut_has_train_configs_name():
    """The prompt-only cut is prompt_truncation_mode, as in TrainConfig: TRL's truncation_mode cuts the
    whole sequence, so no lower-level API takes that name for the prompt."""
    import inspect

    from epsdpo.config import TrainConfig
    from epsdpo.data.stats import compute_stats
    from epsdpo.feed import make_collator

    store = make_store([([1, 2, 3, 4], [5], [6])])
    for mode, kept in (("keep_start", [1, 2]), ("keep_end", [3, 4])):
        collator = epsdpo.Collator(max_prompt_length=2, prompt_truncation_mode=mode)
        assert collator.prompt_truncation_mode == mode and f'prompt_truncation_mode="{mode}"' in repr(collator)
        assert collator(store, [0])["input_ids"][0][:2].tolist() == kept
        from_config = make_collator(TrainConfig(max_length=None, max_prompt_length=2, prompt_truncation_mode=mode), None)
        assert from_config.prompt_truncation_mode == mode
    assert not hasattr(epsdpo.Collator(), "truncation_mode")
    with pytest.raises(TypeError, match="truncation_mode"):
        epsdpo.Collator(truncation_mode="keep_start")
    with pytest.raises(epsdpo.ConfigError, match="^prompt_truncation_mode must be"):
        epsdpo.Collator(prompt_truncation_mode="middle")
    for function in (epsdpo.load_preferences, compute_stats):
        parameters = inspect.signature(function).parameters
        assert "prompt_truncation_mode" in parameters and "truncation_mode" not in parameters
