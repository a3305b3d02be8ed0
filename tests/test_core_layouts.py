"""The Rust collator against the pure-Python oracle, array for array, on random stores."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import epsdpo
from layout_oracle import collate as oracle_collate
from layout_oracle import truncate as oracle_truncate
from name_scan import compared_names

LAYOUTS = epsdpo._core.LAYOUTS
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
    truncation = epsdpo.Truncation(max_length=max_length, max_prompt_length=max_prompt_length,
                                   max_completion_length=max_completion_length, prompt_truncation_mode=mode)
    collator = epsdpo.Collator(layout, truncation=truncation, pad_token_id=5, pad_to_multiple_of=multiple)
    got = collator(store, np.array(indices, dtype=np.int64))
    want = oracle_collate([pairs[i] for i in indices], layout, max_length, max_prompt_length, mode, pad=5, multiple=multiple,
                          max_completion_length=max_completion_length)
    for key in ARRAYS:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got[key].dtype == want[key].dtype, key
    assert got["num_sequences"] == 2 * len(indices)
    np.testing.assert_array_equal(got["pair_indices"], indices)


def row_segments(batch):
    """Each row's attention segments in order of appearance (padding left out)."""
    rows = []
    for row in batch["segment_ids"]:
        real = row[row >= 0]
        rows.append([int(g) for k, g in enumerate(real) if k == 0 or g != real[k - 1]])
    return rows


@settings(max_examples=80, deadline=None)
@given(pairs=pairs_st, layout=st.sampled_from(LAYOUTS), multiple=st.integers(1, 4), data=st.data())
def test_each_layout_says_what_its_batches_are(pairs, layout, multiple, data):
    """The collator states what a layout means (the model side reads these, never the layout's name),
    and every batch it builds bears each statement out."""
    store = make_store(pairs)
    survivors = [i for i, (_, c, r) in enumerate(pairs) if c != r]
    if not survivors:
        return
    indices = data.draw(st.lists(st.sampled_from(survivors), min_size=1, max_size=8))
    collator = epsdpo.Collator(layout, pad_to_multiple_of=multiple)
    batch = collator(store, indices)
    sequences, segments = batch["num_sequences"], row_segments(batch)
    assert batch["branched"] is collator.branched and batch["right_padded"] is collator.right_padded
    # branched: some token sits on an answer branch exactly when the layout says so
    assert bool((batch["branch_ids"] != 0).any()) == collator.branched
    if collator.right_padded:  # one sequence per row, its tokens first, then padding only
        assert len(batch["input_ids"]) == sequences and all(len(s) == 1 for s in segments)
        for row, mask in zip(batch["segment_ids"], batch["attention_mask"]):
            real = int(mask.sum())
            assert (row[:real] >= 0).all() and (row[real:] < 0).all()
    if collator.packs_rows:
        # rows end to end, up to the longest sequence: at least as few rows as one per sequence
        assert len(batch["input_ids"]) <= sequences
        assert sum(len(s) for s in segments) == sequences
        lengths = sorted(int(n) for n in batch["sequence_lengths"])
        # first fit puts the shortest beside the second shortest (or earlier) whenever the two fit one row
        if sequences >= 2 and lengths[0] + lengths[1] <= lengths[-1]:
            assert any(len(s) > 1 for s in segments), "the two shortest sequences fit one row yet were not packed"
    else:
        assert all(len(s) <= 1 for s in segments)  # at most one segment per row: nothing packed


def test_one_list_of_layout_names():
    """Config, CLI and data report take the collator's list; each name builds a collator."""
    import typing

    from epsdpo.cli import build_parser
    from epsdpo.config import Layout
    from epsdpo.data.stats import LAYOUTS as report_layouts

    assert typing.get_args(Layout) == LAYOUTS == report_layouts
    assert [epsdpo.Collator(name).layout for name in LAYOUTS] == list(LAYOUTS)
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    (layout_option,) = [a for a in demo._actions if a.dest == "layout"]
    assert tuple(layout_option.choices) == LAYOUTS


@settings(max_examples=60, deadline=None)
@given(pairs=pairs_st, max_length=st.none() | st.integers(6, 30), max_prompt_length=st.none() | st.integers(1, 5),
       max_completion_length=st.none() | st.integers(1, 16))
def test_truncated_lengths_match_the_oracle(pairs, max_length, max_prompt_length, max_completion_length):
    store = make_store(pairs)
    truncation = epsdpo.Truncation(max_length=max_length, max_prompt_length=max_prompt_length,
                                   max_completion_length=max_completion_length)
    lengths = epsdpo.Collator(truncation=truncation).truncated_lengths(store)
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
        epsdpo.Collator(truncation=epsdpo.Truncation(max_length=4))(store, [1, 0])
    assert info.value.pair_index == 0 and isinstance(info.value, ValueError)
    batch = epsdpo.Collator(truncation=epsdpo.Truncation(max_length=4), skip_empty=True)(store, [1, 0])
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
        epsdpo.Truncation(max_length=8, max_prompt_length=8)
    with pytest.raises(epsdpo.ConfigError, match="max_completion_length"):
        epsdpo.Truncation(max_completion_length=0)
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
        collator = epsdpo.Collator(truncation=epsdpo.Truncation(max_prompt_length=2, prompt_truncation_mode=mode))
        assert collator.truncation.prompt_truncation_mode == mode and f'prompt_truncation_mode="{mode}"' in repr(collator)
        assert collator(store, [0])["input_ids"][0][:2].tolist() == kept
        from_config = make_collator(TrainConfig(max_length=None, max_prompt_length=2, prompt_truncation_mode=mode), None)
        assert from_config.truncation.prompt_truncation_mode == mode
    assert not hasattr(epsdpo.Truncation(), "truncation_mode")
    with pytest.raises(TypeError, match="truncation_mode"):
        epsdpo.Truncation(truncation_mode="keep_start")
    with pytest.raises(epsdpo.ConfigError, match="^prompt_truncation_mode must be"):
        epsdpo.Truncation(prompt_truncation_mode="middle")
    for function in (epsdpo.load_preferences, compute_stats):
        parameters = inspect.signature(function).parameters
        assert "truncation" in parameters and "truncation_mode" not in parameters


def _compared_layout_names(source: str) -> list[int]:
    return compared_names(source, LAYOUTS, "layout", bare_name=True)


def test_no_layout_name_is_compared_outside_the_config():
    """The collator's properties say what a layout means; only the config (which maps padding_free to a
    layout) may spell a name in a comparison, and the Rust registry, which is not Python."""
    from pathlib import Path

    package = Path(epsdpo.__file__).parent
    found = [f"{path.relative_to(package)}:{line}" for path in sorted(package.rglob("*.py"))
             if path.name != "config.py" for line in _compared_layout_names(path.read_text(encoding="utf-8"))]
    assert found == []


def test_the_layout_name_check_finds_each_kind_of_comparison():
    source = ('def f(config, layout, name):\n'
              '    a = config.layout == "shared_prompt"\n'
              '    b = name in ("packed", "x")\n'
              '    c = layout != name\n'
              '    d = name == "dpo"\n')
    assert _compared_layout_names(source) == [2, 3, 4]
