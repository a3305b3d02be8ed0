"""Fuzz the public calls of the Rust binding with arbitrary arguments.

Any outcome is fine except two: the process dying (an abort, a SIGBUS, an impossible allocation),
which kills this test, and an exception outside the typed set below, which fails it. Rust panics
arrive as ``InternalError`` and count as failures too: they are bugs.

Allowed: ``EpsdpoError`` (the binding's own errors, all ``ValueError``), ``TypeError`` (a wrong
argument type) and ``OverflowError`` (pyo3's conversion of an int outside the native range, e.g.
``2**70`` for a size). Each test runs 200 examples in well under a few seconds.

Sizes that are valid but large (a padding multiple up to the 2**24 limit) are legitimate requests
for gigabytes; the fuzz keeps ``pad_to_multiple_of`` out of that band so it runs in megabytes. The
limits themselves are tested exactly in tests/test_fault_data.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import epsdpo

ALLOWED = (epsdpo.EpsdpoError, TypeError, OverflowError)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Ints around every edge: small, negative, the native limits, far beyond them.
EDGES = [0, 1, 2, -1, 2**8, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), 2**70, -(2**70)]
ints = st.one_of(st.integers(-3, 40), st.sampled_from(EDGES), st.integers(-(2**80), 2**80))
# Not ints at all: the binding must say TypeError (or take them, if it can).
junk = st.one_of(st.none(), st.floats(allow_nan=True), st.text(max_size=5), st.booleans(), st.lists(st.integers(0, 5), max_size=3))
anything = st.one_of(ints, junk)
small_pads = st.one_of(st.integers(-3, 64), st.sampled_from([0, -1, 2**24 + 1, 2**33, 2**63, 2**64, 2**70]))
dtypes = st.sampled_from([np.int64, np.int32, np.uint32, np.uint64, np.uint16, np.int8, np.float32, np.bool_])


@contextlib.contextmanager
def typed_errors_only() -> Iterator[None]:
    try:
        yield
    except ALLOWED:
        pass


def call(fn: Callable[[], Any]) -> Any:
    """Run one binding call; a typed error is an accepted outcome, anything else propagates."""
    with typed_errors_only():
        return fn()
    return None


def array(draw: Any, max_size: int = 12) -> Any:
    values = draw(st.lists(st.integers(-5, 300), max_size=max_size))
    dtype = draw(dtypes)
    with np.errstate(all="ignore"):
        return np.array(values).astype(dtype) if values else np.array([], dtype=dtype)


@st.composite
def stores(draw: Any) -> epsdpo.PreferenceStore:
    """A small valid store (the fuzzing of stores themselves is in test_store_calls)."""
    store = epsdpo.PreferenceStore(vocab_size=draw(st.sampled_from([None, 400, 2**32 - 1])))
    for _ in range(draw(st.integers(0, 6))):
        span = st.lists(st.integers(0, 399), min_size=1, max_size=8)
        store.add_pair(draw(span), draw(span), draw(span))
    return store


@FUZZ
@given(data=st.data())
def test_store_calls(tmp_path_factory: Any, data: Any) -> None:
    d = data.draw
    store = call(lambda: epsdpo.PreferenceStore(vocab_size=d(st.one_of(ints, st.none(), junk))))
    if store is None:
        store = epsdpo.PreferenceStore()
    for _ in range(d(st.integers(1, 4))):
        what = d(st.sampled_from(["add_pair", "append", "getitem", "pair_id", "lengths", "ids"]))
        if what == "add_pair":
            span = st.one_of(st.lists(ints, max_size=5), junk)
            call(lambda: store.add_pair(d(span), d(span), d(span), id=d(st.one_of(st.none(), ints))))
        elif what == "append":
            cols = [array(d) for _ in range(6)]
            ids = d(st.one_of(st.none(), st.lists(st.integers(0, 2**64 - 1), max_size=4).map(lambda v: np.array(v, dtype=np.uint64))))
            call(lambda: store.append(*cols, ids=ids))
        elif what == "getitem":
            call(lambda: store[d(ints)])
        elif what == "pair_id":
            call(lambda: store.pair_id(d(ints)))
        else:
            call(getattr(store, what))
    # Arbitrary bytes as a store file: a damaged file is a typed error, never a crash.
    path = Path(tmp_path_factory.mktemp("fuzz")) / "x.store"
    good = call(lambda: (store.save(path), path.read_bytes())[1]) or b""
    blob = d(st.one_of(st.binary(max_size=300), st.just(good)))
    if blob and d(st.booleans()):
        k = d(st.integers(0, len(blob) - 1))
        blob = blob[:k] + bytes([blob[k] ^ (1 << d(st.integers(0, 7)))]) + blob[k + 1 :]
    path.write_bytes(blob)
    loaded = call(lambda: epsdpo.PreferenceStore.load(path))
    if loaded is not None:
        call(lambda: epsdpo.Collator()(loaded, list(range(len(loaded)))))


@FUZZ
@given(store=stores(), data=st.data())
def test_collator_calls(store: epsdpo.PreferenceStore, data: Any) -> None:
    d = data.draw
    limits = {
        "max_length": d(st.one_of(st.none(), ints, junk)),
        "max_prompt_length": d(st.one_of(st.none(), ints, junk)),
        "max_completion_length": d(st.one_of(st.none(), ints, junk)),
        "prompt_truncation_mode": d(st.one_of(st.sampled_from(["keep_end", "keep_start"]), st.text(max_size=4))),
    }
    truncation = call(lambda: epsdpo.Truncation(**{k: v for k, v in limits.items() if d(st.booleans())}))
    kwargs = {
        "truncation": d(st.one_of(st.just(truncation), junk)),
        "pad_token_id": d(st.one_of(ints, junk)),
        "pad_to_multiple_of": d(st.one_of(small_pads, junk)),
        "capacity": d(st.one_of(st.none(), ints, junk)),
        "skip_empty": d(st.booleans()),
    }
    kwargs = {k: v for k, v in kwargs.items() if d(st.booleans())}
    layout = d(st.one_of(st.sampled_from(epsdpo._core.LAYOUTS), st.text(max_size=4)))
    collator = call(lambda: epsdpo.Collator(layout, **kwargs))
    if collator is None:
        return
    n = max(len(store), 1)
    indices = d(st.one_of(st.lists(st.integers(-2, n + 1), max_size=10), st.lists(ints, max_size=3), junk))
    as_array = d(st.booleans()) and isinstance(indices, list) and all(isinstance(i, int) for i in indices)
    if as_array:
        with np.errstate(all="ignore"), contextlib.suppress(OverflowError):
            indices = np.array(indices).astype(d(dtypes))
    batch = call(lambda: collator(store, indices))
    if batch is not None:
        assert batch["input_ids"].shape[0] * batch["input_ids"].shape[1] == len(batch["segment_ids"].ravel())
    call(lambda: collator.truncated_lengths(store))


@FUZZ
@given(data=st.data())
def test_sampler_calls(data: Any) -> None:
    d = data.draw
    n = d(st.integers(0, 30))
    lengths = st.one_of(st.lists(st.integers(-2, 600), min_size=n, max_size=n), junk)
    chosen, rejected = d(lengths), d(lengths)
    if d(st.booleans()) and isinstance(chosen, list) and isinstance(rejected, list):
        with np.errstate(all="ignore"):
            dtype = d(dtypes)
            chosen, rejected = np.array(chosen, dtype=np.int64).astype(dtype), np.array(rejected, dtype=np.int64).astype(dtype)
    kwargs = {
        "mode": d(st.one_of(st.sampled_from(["shuffle", "length_grouped", "token_budget"]), st.text(max_size=4))),
        "seed": d(ints),
        "world_size": d(st.one_of(st.integers(-1, 5), st.sampled_from([2**20, 2**20 + 1, 2**40]), junk)),
        "rank": d(st.one_of(st.integers(-1, 5), ints)),
        "drop_last": d(st.booleans()),
        "mega_batch_mult": d(st.one_of(ints, junk)),
        "max_tokens": d(st.one_of(st.none(), ints, junk)),
        "padded": d(st.booleans()),
    }
    kwargs = {k: v for k, v in kwargs.items() if d(st.booleans())}
    sampler = call(lambda: epsdpo.BatchSampler(chosen, rejected, d(st.one_of(ints, junk)), **kwargs))
    if sampler is None:
        return
    for _ in range(d(st.integers(0, 3))):
        call(lambda: next(sampler))
    call(lambda: sampler.set_epoch(d(ints)))
    call(lambda: sampler.epoch_batches(d(ints)))
    state = d(st.one_of(st.just(sampler.state_dict()), st.dictionaries(st.text(max_size=6), st.binary(max_size=60), max_size=2), junk))
    call(lambda: sampler.load_state_dict(state))
    assert len(sampler) >= 0


@FUZZ
@given(data=st.data())
def test_kl_controller_calls(data: Any) -> None:
    d = data.draw
    floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.1, 0.5, 0.999, 1.0, -0.1]))
    kl = call(lambda: epsdpo.KlController(d(st.one_of(floats, junk)), d(st.one_of(floats, junk))))
    if kl is None:
        kl = epsdpo.KlController(0.1, 0.5)
    for _ in range(d(st.integers(1, 6))):
        what = d(st.sampled_from(["betas_for", "record", "apply_update", "state"]))
        if what == "betas_for":
            call(lambda: kl.betas_for(array(d)))
        elif what == "record":
            call(lambda: kl.record(array(d), array(d)))
        elif what == "apply_update":
            before = kl.beta
            total, count = d(st.one_of(ints, junk)), d(st.one_of(ints, junk))
            new = call(lambda: kl.apply_update(total, count))
            if new is None:
                assert kl.beta == before, "a refused update leaves beta alone"
            else:
                assert np.isfinite(new) and new > 0
        else:
            state = d(st.one_of(st.just(kl.state_dict()), st.builds(lambda b: {"state": b}, st.binary(max_size=120)), junk))
            call(lambda: kl.load_state_dict(state))
    assert np.isfinite(kl.beta) and kl.beta > 0
