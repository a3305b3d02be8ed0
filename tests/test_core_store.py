"""PreferenceStore through Python: bulk append, validation that changes nothing, files."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import epsdpo


def columns(pairs, dtype=np.int64):
    """Flat tokens + offsets for prompt, chosen, rejected, the way ingestion hands them over."""
    out = []
    for k in range(3):
        spans = [p[k] for p in pairs]
        out.append(np.array([t for s in spans for t in s], dtype=dtype))
        out.append(np.cumsum([0] + [len(s) for s in spans]).astype(np.int64))
    return out


def snapshot(store):
    return [tuple(map(list, store[i])) for i in range(len(store))], store.ids().tolist()


GOOD = [([1, 2], [3], [4, 5]), ([6], [7, 8, 9], [10])]


@settings(max_examples=40, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(*[st.lists(st.integers(0, 2**20), min_size=1, max_size=12)] * 3), min_size=0, max_size=20
    ),
    dtype=st.sampled_from([np.int64, np.int32, np.uint32]),
)
def test_bulk_append_save_load_round_trip(tmp_path_factory, pairs, dtype):
    store = epsdpo.PreferenceStore()
    assert store.append(*columns(pairs, dtype)) == (0, len(pairs))
    path = tmp_path_factory.mktemp("s") / "pairs.store"
    store.save(path)
    loaded = epsdpo.PreferenceStore.load(path)
    assert loaded.is_memory_mapped and len(loaded) == len(pairs)
    assert snapshot(loaded) == snapshot(store)
    assert [tuple(map(list, loaded[i])) for i in range(len(pairs))] == [tuple(map(list, p)) for p in pairs]
    lengths = loaded.lengths()
    for k in range(3):
        assert lengths[k].tolist() == [len(p[k]) for p in pairs]


@pytest.mark.parametrize(
    "mutate, error, pair",
    [
        (lambda c: c.__setitem__(2, c[2].astype(np.float32)), TypeError, None),   # wrong dtype
        (lambda c: c[2].__setitem__(3, -4), epsdpo.InvalidPairError, 1),           # negative id
        (lambda c: c[4].__setitem__(0, 100), epsdpo.InvalidPairError, 0),          # id >= vocab
        (lambda c: c.__setitem__(3, np.array([0, 0, 3])), epsdpo.InvalidPairError, 0),  # empty chosen
        (lambda c: c.__setitem__(5, np.array([0, 2, 1])), epsdpo.InvalidPairError, 1),  # offsets out of order
        (lambda c: c.__setitem__(1, np.array([0, 2, 9])), epsdpo.InvalidPairError, 1),  # offset past the end
    ],
    ids=["dtype", "negative", "vocab", "empty", "order", "bounds"],
)
def test_bad_input_raises_its_exception_and_changes_nothing(mutate, error, pair):
    store = epsdpo.PreferenceStore(vocab_size=100)
    store.append(*columns(GOOD))
    before = snapshot(store)
    cols = columns(GOOD)
    mutate(cols)
    with pytest.raises(error) as info:
        store.append(*cols)
    if pair is not None:
        assert info.value.pair_index == pair
        assert f"pair {pair}" in str(info.value)
    assert snapshot(store) == before


def test_duplicate_ids_and_single_adds():
    store = epsdpo.PreferenceStore()
    store.append(*columns(GOOD), ids=np.array([7, 9], dtype=np.uint64))
    with pytest.raises(epsdpo.InvalidPairError, match="already used"):
        store.add_pair([1], [2], [3], id=9)
    assert store.add_pair([1], [2], [3]) == 2
    assert store.pair_id(2) == 10  # auto ids continue past the largest in use
    with pytest.raises(epsdpo.InvalidPairError):
        store[5]
    assert [list(a) for a in store[-1]] == [[1], [2], [3]]


def test_damaged_files_raise_store_file_error(tmp_path):
    store = epsdpo.PreferenceStore(vocab_size=100)
    store.append(*columns(GOOD))
    path = tmp_path / "pairs.store"
    store.save(path)
    good = path.read_bytes()
    damaged = tmp_path / "damaged.store"
    for name, data in {
        "truncated": good[: len(good) // 2],
        "flipped": good[:50] + bytes([good[50] ^ 1]) + good[51:],
        "version": good[:8] + b"\x09" + good[9:],
        "not a store": b"hello world" * 10,
    }.items():
        damaged.write_bytes(data)
        with pytest.raises(epsdpo.StoreFileError):
            epsdpo.PreferenceStore.load(damaged)
    with pytest.raises(OSError):
        epsdpo.PreferenceStore.load(tmp_path / "missing.store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.store", "pairs.store"]
