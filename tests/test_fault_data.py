"""Bad input, one test item per input: each must raise its typed error with a message that names
the argument, the file, the line or the row, or (under ``skip_invalid``) be skipped and counted.
Nothing may abort the interpreter.

Inputs that used to kill the process (a 137 GB allocation, a SIGBUS from a truncated mapped file)
run in a child interpreter with a capped address space, so a regression fails its test instead of
taking the test session (or the machine) down with it.

``pytest tests/test_fault_data.py -q`` reports one passed item per bad input (docs/data.md quotes
the count).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import pytest

import epsdpo
from epsdpo import _core
from epsdpo.data import DataSourceError, InvalidRowError, load_preferences
from epsdpo.data import ingest as ingest_mod
from test_data import build_tokenizer

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def small_store(vocab_size: int | None = 10, n: int = 4) -> epsdpo.PreferenceStore:
    store = epsdpo.PreferenceStore(vocab_size=vocab_size)
    for k in range(n):
        store.add_pair([1, 2, 3], [4, 5 + k % 4], [6])
    return store


def isolated(code: str, address_space_gb: int = 8) -> tuple[str, str]:
    """Run ``code`` in a fresh interpreter whose address space is capped; return the name and
    text of what it raised (``"no error"`` if nothing). Asserts the interpreter survived."""
    script = "import json, epsdpo\ntry:\n" + textwrap.indent(textwrap.dedent(code), "    ") + textwrap.dedent("""
        except BaseException as e:
            print(json.dumps([type(e).__name__, str(e)]))
        else:
            print(json.dumps(["no error", ""]))
    """)

    def cap() -> None:
        import resource

        limit = address_space_gb << 30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "RUST_BACKTRACE": "0"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, preexec_fn=cap, env=env)
    assert proc.returncode == 0, f"the interpreter died (exit {proc.returncode}): {proc.stderr[-2000:]}"
    name, message = json.loads(proc.stdout.strip().splitlines()[-1])
    return name, message


def expect(call: Callable[[], Any], error: type[BaseException], *names: str) -> BaseException:
    with pytest.raises(error) as info:
        call()
    for name in names:
        assert name in str(info.value), f"{str(info.value)!r} does not name {name!r}"
    return info.value


# --------------------------------------------------------------------------------------------
# The Rust core through the binding: sizes, counts, vocabularies
# --------------------------------------------------------------------------------------------

BIG = 2**40  # in range for the native ints, far above every limit

BINDING_CASES: dict[str, tuple[Callable[[], Any], type[BaseException], tuple[str, ...]]] = {
    "collator capacity above the row limit": (lambda: epsdpo.Collator("packed", capacity=BIG), epsdpo.ConfigError, ("capacity", str(BIG))),
    "truncation max_length above the row limit": (lambda: epsdpo.Truncation(max_length=BIG), epsdpo.ConfigError, ("max_length", str(BIG))),
    "truncation max_prompt_length above the row limit": (lambda: epsdpo.Truncation(max_prompt_length=BIG), epsdpo.ConfigError, ("max_prompt_length",)),
    "truncation max_completion_length above the row limit": (lambda: epsdpo.Truncation(max_completion_length=BIG), epsdpo.ConfigError, ("max_completion_length",)),
    "collator negative pad_to_multiple_of": (lambda: epsdpo.Collator(pad_to_multiple_of=-1), epsdpo.ConfigError, ("pad_to_multiple_of", "-1")),
    "collator zero pad_to_multiple_of": (lambda: epsdpo.Collator(pad_to_multiple_of=0), epsdpo.ConfigError, ("pad_to_multiple_of",)),
    "collator negative capacity": (lambda: epsdpo.Collator("packed", capacity=-3), epsdpo.ConfigError, ("capacity", "-3")),
    "collator pad_token_id above u32": (lambda: epsdpo.Collator(pad_token_id=2**32), epsdpo.ConfigError, ("pad_token_id",)),
    "collator unknown layout": (lambda: epsdpo.Collator("diagonal"), epsdpo.ConfigError, ("layout", "diagonal")),
    "collator batch over the cell limit": (
        # Each value within its limit, but 18 rows x 2**24 columns exceed the cells of one batch.
        lambda: epsdpo.Collator(pad_to_multiple_of=2**24)(small_store(), [0] * 9),
        epsdpo.ConfigError,
        ("pad_to_multiple_of", "18 rows"),
    ),
    "sampler max_tokens above the batch limit": (
        lambda: epsdpo.BatchSampler([3, 4], [3, 4], 1, mode="token_budget", max_tokens=BIG),
        epsdpo.ConfigError,
        ("max_tokens", str(BIG)),
    ),
    "sampler world_size above the limit": (lambda: epsdpo.BatchSampler([3, 4], [3, 4], 1, world_size=2**30), epsdpo.ConfigError, ("world_size",)),
    "sampler negative batch_size": (lambda: epsdpo.BatchSampler([3, 4], [3, 4], -2), epsdpo.ConfigError, ("batch_size", "-2")),
    "sampler negative rank": (lambda: epsdpo.BatchSampler([3, 4], [3, 4], 1, rank=-1), epsdpo.ConfigError, ("rank", "-1")),
    "sampler negative length": (lambda: epsdpo.BatchSampler([3, -4], [3, 4], 1), epsdpo.ConfigError, ("chosen_lengths", "-4")),
    "store vocab_size 0": (lambda: epsdpo.PreferenceStore(vocab_size=0), epsdpo.ConfigError, ("vocab_size", "0")),
    "store negative vocab_size": (lambda: epsdpo.PreferenceStore(vocab_size=-5), epsdpo.ConfigError, ("vocab_size", "-5")),
    "store vocab_size above u32": (lambda: epsdpo.PreferenceStore(vocab_size=2**32), epsdpo.ConfigError, ("vocab_size",)),
}


@pytest.mark.parametrize("case", list(BINDING_CASES))
def test_binding_refuses_with_a_named_argument(case: str) -> None:
    call, error, names = BINDING_CASES[case]
    expect(call, error, *names)


def test_pad_to_multiple_of_2_33_is_refused_not_allocated() -> None:
    # Before: the collator asked for 2 rows x 2**33 columns (137 GB) and the process died.
    name, message = isolated("""
        store = epsdpo.PreferenceStore()
        store.add_pair([1], [2], [3])
        epsdpo.Collator("padded", pad_to_multiple_of=2**33)(store, [0])
    """)
    assert name == "ConfigError" and "pad_to_multiple_of" in message and str(2**33) in message


KL_CASES = {
    "sum above count": (5, 3),
    "negative sum below -count": (-4, 3),
    "steps with no pairs": (1, 0),
    "negative count": (0, -1),
    "sum beyond 64 bits": (2**70, 1),
    "count beyond 64 bits": (0, 2**70),
}


@pytest.mark.parametrize("case", list(KL_CASES))
def test_kl_update_refuses_impossible_sums_and_keeps_beta(case: str) -> None:
    total, count = KL_CASES[case]
    kl = epsdpo.KlController(0.1, 0.5)
    kl.record(np.array([1, 2], dtype=np.uint64), np.array([1, 1], dtype=np.int8))
    before = (kl.beta, kl.beta_history().tolist(), kl.local_sums())
    expect(lambda: kl.apply_update(total, count), epsdpo.ConfigError, "global_sum", str(total), str(count))
    assert (kl.beta, kl.beta_history().tolist(), kl.local_sums()) == before, "a refused update changes nothing"


def test_kl_update_refuses_a_non_integer() -> None:
    kl = epsdpo.KlController(0.1, 0.5)
    expect(lambda: kl.apply_update(1.5, 2), TypeError, "global_sum")


# --------------------------------------------------------------------------------------------
# Store files: missing, unwritable, directories, changed while memory-mapped
# --------------------------------------------------------------------------------------------


def test_load_of_a_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "pairs.store"
    err = expect(lambda: epsdpo.PreferenceStore.load(path), FileNotFoundError, str(path))
    assert err.filename == str(path)  # type: ignore[attr-defined]


def test_load_of_a_directory_names_the_path(tmp_path: Path) -> None:
    expect(lambda: epsdpo.PreferenceStore.load(tmp_path), epsdpo.StoreFileError, str(tmp_path), "directory")


def test_save_into_a_missing_directory_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "pairs.store"
    err = expect(lambda: small_store().save(path), FileNotFoundError, str(path))
    assert err.filename == str(path)  # type: ignore[attr-defined]


def test_save_over_a_directory_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    expect(lambda: small_store().save(tmp_path / "taken"), OSError, str(tmp_path / "taken"))
    assert [p.name for p in tmp_path.iterdir()] == ["taken"], "no temporary file is left behind"


def tokens_at(n_pairs: int) -> int:
    """Byte offset of the token array in a saved store (header 40, bounds, ids)."""
    return 40 + 8 * (3 * n_pairs + 1) + 8 * n_pairs


def rewrite(path: Path, at: int, data: bytes, keep_mtime: bool) -> None:
    """Overwrite in place; with ``keep_mtime`` put the modification time back, else move it on."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)
    ns = st.st_mtime_ns if keep_mtime else st.st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(st.st_atime_ns, ns))


def test_mapped_store_rewritten_in_place_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pairs.store"
    small_store().save(path)
    loaded = epsdpo.PreferenceStore.load(path)
    rewrite(path, tokens_at(4), (7).to_bytes(4, "little"), keep_mtime=False)
    expect(lambda: epsdpo.Collator()(loaded, [0]), epsdpo.StoreFileError, str(path), "modified")
    expect(lambda: loaded.lengths(), epsdpo.StoreFileError, str(path))
    expect(lambda: loaded[0], epsdpo.StoreFileError, str(path))


def test_mapped_store_truncated_is_an_error_not_sigbus(tmp_path: Path) -> None:
    # Before: reading the pages past the new end killed the process with SIGBUS.
    path = tmp_path / "pairs.store"
    name, message = isolated(f"""
        store = epsdpo.PreferenceStore(vocab_size=1000)
        for k in range(3000):
            store.add_pair([1, 2, 3], [4, 5], [6])
        store.save({str(path)!r})
        loaded = epsdpo.PreferenceStore.load({str(path)!r})
        import os
        os.truncate({str(path)!r}, 4096)
        epsdpo.Collator()(loaded, [2999])
    """)
    assert name == "StoreFileError" and str(path) in message and "truncated" in message


def test_mapped_token_above_vocab_names_the_pair(tmp_path: Path) -> None:
    path = tmp_path / "pairs.store"
    small_store().save(path)
    loaded = epsdpo.PreferenceStore.load(path)
    rewrite(path, tokens_at(4) + 4 * (2 * 6 + 3), (99).to_bytes(4, "little"), keep_mtime=True)
    err = expect(lambda: epsdpo.Collator()(loaded, [0, 2]), epsdpo.StoreFileError, "pair 2", "99", "vocab_size 10", str(path))
    assert err.pair_index == 2  # type: ignore[attr-defined]
    assert len(epsdpo.Collator()(loaded, [0, 1, 3])["pair_ids"]) == 3, "the other pairs still read"


def test_mapped_bounds_out_of_range_name_the_pair(tmp_path: Path) -> None:
    # Before: slicing with the rewritten bounds panicked (pyo3's PanicException, a BaseException).
    path = tmp_path / "pairs.store"
    small_store(None).save(path)
    loaded = epsdpo.PreferenceStore.load(path)
    rewrite(path, 40 + 8 * 4, (2**64 - 1).to_bytes(8, "little"), keep_mtime=True)
    err = expect(lambda: epsdpo.Collator()(loaded, [1]), epsdpo.StoreFileError, "pair 1")
    assert err.pair_index == 1  # type: ignore[attr-defined]
    expect(lambda: loaded[1], epsdpo.StoreFileError, "pair 1")


def test_a_rust_panic_arrives_as_internal_error() -> None:
    expect(lambda: _core._raise_panic("deliberate"), _core.InternalError, "deliberate", "internal error")
    assert issubclass(_core.InternalError, RuntimeError) and not issubclass(_core.InternalError, ValueError)
    assert len(small_store()) == 4, "the interpreter carries on"


# --------------------------------------------------------------------------------------------
# Ingestion: bad bytes, bad JSON, bad text, each naming the file and the line or row
# --------------------------------------------------------------------------------------------

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer(template=TEMPLATE)  # test_data's tokenizer, with this file's chat template


def good_row(i: int) -> dict[str, str]:
    return {"prompt": f"Question {i}: what is the answer?", "chosen": f" The answer is {i}.", "rejected": " I do not know."}


def conv_row(i: int) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": f"what is the answer {i}?"}],
        "chosen": [{"role": "assistant", "content": f"the answer is {i}"}],
        "rejected": [{"role": "assistant", "content": "I do not know"}],
    }


def line(row: Any) -> bytes:
    return json.dumps(row).encode()


# Each case: the bad line (bytes), the reason code, and text the message must hold besides the
# file name, the row and the line. The bad line goes third (row 2, line 4: a blank line precedes it).
ROW_CASES: dict[str, tuple[bytes, str, str]] = {
    "non-UTF-8 byte": (line(good_row(2))[:-2] + b'\xff"}', "invalid_utf8", "0xff"),
    "lone surrogate in a text field": (b'{"prompt": "p\\ud800", "chosen": " a", "rejected": " b"}', "invalid_text", "U+D800"),
    "lone surrogate in a completion": (b'{"prompt": "p", "chosen": " a\\udfff", "rejected": " b"}', "invalid_text", "'chosen'"),
    "100k-deep nesting": (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b', "chosen": " a", "rejected": " b"}', "too_deep", "nested too deeply"),
    "invalid JSON": (b'{"prompt": "p", "chosen": ', "invalid_json", "not valid JSON"),
    "a JSON array, not an object": (b'["p", " a", " b"]', "not_an_object", "array"),
    "a JSON string, not an object": (b'"just text"', "not_an_object", "string"),
    "wrong type": (b'{"prompt": "p", "chosen": 5, "rejected": " b"}', "non_string_content", "int"),
    "missing field": (b'{"prompt": "p", "rejected": " b"}', "missing_field", "'chosen'"),
    # Python refuses to convert an int of over 4300 digits: a bare ValueError with no file or line, before
    "an integer of 5000 digits": (b'{"prompt": "p", "chosen": ' + b"7" * 5000 + b', "rejected": " b"}', "number_too_long", "5,000 digits"),
    "an integer of 5000 digits in another column": (b'{"prompt": "p", "chosen": " a", "rejected": " b", "score": -' + b"7" * 5000 + b"}", "number_too_long", "5,000 digits"),
}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_bad_jsonl_line_names_file_row_and_line_and_is_skippable(case: str, tok: Any, tmp_path: Path) -> None:
    bad, code, detail = ROW_CASES[case]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([line(good_row(0)), line(good_row(1)), b"", bad, line(good_row(3))]) + b"\n")
    err = expect(lambda: load_preferences(path, tok, cache_dir=None, progress=False), InvalidRowError, "rows.jsonl", "row 2", "line 4", detail)
    assert err.row == 2  # type: ignore[attr-defined]
    store, report = load_preferences(path, tok, cache_dir=None, progress=False, skip_invalid=True)
    assert report.skipped == {code: 1} and report.skipped_rows[0][:2] == [2, code]
    assert store.ids().tolist() == [0, 1, 3] and report.num_rows == 4


CONV_CASES = {
    "lone surrogate in message content": ("content", "\ud800", "U+D800"),
    "lone surrogate in another message field": ("name", "x\udc00", "rendered conversation"),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_bad_text_in_a_conversation_names_the_row_and_is_skippable(case: str, tmp_path: Path) -> None:
    key, value, detail = CONV_CASES[case]
    # A template that renders a message's name too, so a bad name reaches the rendered text.
    tokenizer = build_tokenizer(template="{% for m in messages %}<|{{ m['role'] }}|>{{ m.get('name', '') }}\n{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    rows = [conv_row(0), conv_row(1), conv_row(2)]
    rows[1]["chosen"][0][key] = value
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expect(lambda: load_preferences(path, tokenizer, cache_dir=None, progress=False), InvalidRowError, "conv.jsonl", "row 1", "line 2", detail)
    store, report = load_preferences(path, tokenizer, cache_dir=None, progress=False, skip_invalid=True)
    assert report.skipped == {"invalid_text": 1} and store.ids().tolist() == [0, 2]


def test_a_row_the_tokenizer_refuses_is_that_rows_failure(tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ingest_mod.BatchEncoder.encode

    def picky(self: Any, texts: list[str]) -> Any:
        if any("poison" in t for t in texts):
            raise ValueError("cannot encode poison")
        return real(self, texts)

    monkeypatch.setattr(ingest_mod.BatchEncoder, "encode", picky)
    rows = [good_row(0), {**good_row(1), "chosen": " poison"}, good_row(2)]
    ds = datasets.Dataset.from_list(rows)
    expect(lambda: load_preferences(ds, tok, cache_dir=None, progress=False), InvalidRowError, "row 1", "tokenizer", "poison")
    store, report = load_preferences(ds, tok, cache_dir=None, progress=False, skip_invalid=True)
    assert report.skipped == {"tokenizer_error": 1} and store.ids().tolist() == [0, 2]


def test_an_unforeseen_row_failure_is_that_rows_failure(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ingest_mod._normalize_row

    def fragile(prompt: Any, *rest: Any) -> Any:
        if prompt == "boom":
            raise RuntimeError("unforeseen")
        return real(prompt, *rest)

    monkeypatch.setattr(ingest_mod, "_normalize_row", fragile)
    ds = datasets.Dataset.from_list([good_row(0), {**good_row(1), "prompt": "boom"}, good_row(2)])
    expect(lambda: load_preferences(ds, tok, cache_dir=None, progress=False), InvalidRowError, "row 1", "RuntimeError: unforeseen")
    _, report = load_preferences(ds, tok, cache_dir=None, progress=False, skip_invalid=True)
    assert report.skipped == {"invalid_row": 1}


def deep(n: int) -> str:
    return "[" * n + "]" * n


FILE_CASES: dict[str, tuple[str, Callable[[], bytes], tuple[str, ...]]] = {
    "non-UTF-8 byte in a .json file": ("rows.json", lambda: json.dumps([good_row(0)], indent=1).encode().replace(b"Question", b"Qu\xe9stion"), ("rows.json", "line 3", "UTF-8", "0xe9")),
    "invalid .json file": ("rows.json", lambda: b'[{"prompt": "p",\n "chosen": }]', ("rows.json", "line 2", "not valid JSON")),
    "100k-deep .json file": ("rows.json", lambda: deep(100_000).encode(), ("rows.json", "nested too deeply")),
    "a .json scalar": ("rows.json", lambda: b"42", ("rows.json", "expected a JSON list")),
    "a corrupt .jsonl.gz": ("rows.jsonl.gz", lambda: gzip.compress(b"\n".join(line(good_row(i)) for i in range(50)))[:-30], ("rows.jsonl.gz", "gzip")),
    "not gzip at all": ("rows.jsonl.gz", lambda: b"plain text, not gzip", ("rows.jsonl.gz", "gzip")),
    "not a parquet file": ("rows.parquet", lambda: b"PAR1 but not really", ("rows.parquet", "Parquet")),
    "an integer of 5000 digits in a .json file": ("rows.json", lambda: b'[{"prompt": "p", "chosen": ' + b"7" * 5000 + b', "rejected": " b"}]', ("rows.json", "5,000 digits")),
    "every line unreadable": ("rows.jsonl", lambda: b"\xff\xfe\n{broken\n", ("rows.jsonl", "line 1", "UTF-8", "no readable row")),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_unreadable_file_names_the_file(case: str, tok: Any, tmp_path: Path) -> None:
    name, data, names = FILE_CASES[case]
    path = tmp_path / name
    path.write_bytes(data())
    for skip in (False, True):  # a file that cannot be read is not a bad row: skipping does not hide it
        expect(lambda: load_preferences(path, tok, cache_dir=None, progress=False, skip_invalid=skip), DataSourceError, *names)


def as_source(kind: str, tmp_path: Path, rows: list[dict[str, Any]]) -> Any:
    """`rows` as a datasets.Dataset or a file of the suffix `kind`."""
    if kind == "dataset":
        return datasets.Dataset.from_list(rows)
    path = tmp_path / f"rows.{kind}"
    text = json.dumps(rows) if kind == "json" else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode(), compresslevel=1) if kind.endswith(".gz") else text.encode())
    return path


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "dataset"])
@pytest.mark.parametrize("field", ["prompt", "chosen", "message content"])
def test_an_oversize_row_is_a_named_skippable_bad_row(kind: str, field: str, tok: Any, tmp_path: Path) -> None:
    """A row far longer than max_length could use (here 3 MB with max_length=64: the limit is 1 MiB)
    is refused before it is parsed (JSON Lines) or tokenized (every source), named, and skippable."""
    text = "lol " * 750_000
    if field == "message content":
        rows = [conv_row(i) for i in range(4)]
        rows[1]["chosen"] = [{"role": "assistant", "content": text}]
    else:
        rows = [good_row(i) for i in range(4)]
        rows[1][field] = text
    source = as_source(kind, tmp_path, rows)
    where = "Dataset" if kind == "dataset" else f"rows.{kind}"
    start = time.perf_counter()
    err = expect(lambda: load_preferences(source, tok, truncation=epsdpo.Truncation(max_length=64), cache_dir=None, progress=False), InvalidRowError,
                 where, "row 1", "over the row limit of 1,048,576 (max_row_bytes")
    assert err.row == 1  # type: ignore[attr-defined]
    store, report = load_preferences(source, tok, truncation=epsdpo.Truncation(max_length=64), cache_dir=None, progress=False, skip_invalid=True)
    assert report.skipped == {"row_too_large": 1} and store.ids().tolist() == [0, 2, 3]
    assert time.perf_counter() - start < 10  # before: the whole row went through the template and tokenizer


def test_an_oversize_jsonl_line_is_never_held_whole(tok: Any, tmp_path: Path) -> None:
    """A 24 MB line (in a 25 kB .jsonl.gz) is read in chunks and dropped: peak Python memory stays
    a few MB; before, the line, its text and its parse were each held whole."""
    import tracemalloc

    big = json.dumps({"prompt": "p" * (24 << 20), "chosen": " a", "rejected": " b"}).encode()
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join([line(good_row(0)), big, line(good_row(2))]) + b"\n"))
    tracemalloc.start()
    try:
        store, report = load_preferences(path, tok, truncation=epsdpo.Truncation(max_length=64), cache_dir=None, progress=False, skip_invalid=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.skipped == {"row_too_large": 1} and store.ids().tolist() == [0, 2]
    assert peak < 8 << 20, f"peak {peak / 2**20:.0f} MiB"


def test_max_row_bytes_overrides_the_limit_and_keys_the_cache(tok: Any, tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [good_row(0), {**good_row(1), "prompt": "word " * 40}, good_row(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    size = len(json.dumps(rows[1]))
    for limit, kept in ((size - 1, [0, 2]), (size, [0, 1, 2]), (None, [0, 1, 2])):
        store, report = load_preferences(path, tok, max_row_bytes=limit, cache_dir=tmp_path / "cache", progress=False,
                                         skip_invalid=True)
        assert store.ids().tolist() == kept, limit  # a cached store of another limit is never reused
    with pytest.raises(InvalidRowError, match=rf"row 1 \(line 2\): {size:,} bytes, over the row limit of {size - 1:,}"):
        load_preferences(path, tok, max_row_bytes=size - 1, cache_dir=None, progress=False)


def test_a_byte_order_mark_is_not_an_error(tok: Any, tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(line(good_row(i)) for i in range(3)) + b"\n")
    store, report = load_preferences(path, tok, cache_dir=None, progress=False)
    assert len(store) == 3 and not report.skipped


# --------------------------------------------------------------------------------------------
# The cache: damaged reports, orphaned temporary files, unwritable directories
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("report_text", ["[1, 2, 3]", '"a string"', "null", "42", deep(100_000)], ids=["list", "string", "null", "number", "deep"])
def test_a_report_that_is_not_an_object_is_rebuilt(report_text: str, tok: Any, tmp_path: Path) -> None:
    ds = datasets.Dataset.from_list([good_row(i) for i in range(3)])
    store, report = load_preferences(ds, tok, cache_dir=tmp_path, progress=False)
    rpath = Path(report.cache_path).with_suffix(".json")
    rpath.write_text(report_text)
    with pytest.warns(UserWarning, match="damaged cache entry"):
        again, rebuilt = load_preferences(ds, tok, cache_dir=tmp_path, progress=False)
    assert not rebuilt.cache_hit and again.ids().tolist() == store.ids().tolist()
    assert load_preferences(ds, tok, cache_dir=tmp_path, progress=False)[1].cache_hit, "and the rebuilt entry is used"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_files_of_killed_writers_are_removed(tok: Any, tmp_path: Path) -> None:
    ds = datasets.Dataset.from_list([good_row(i) for i in range(3)])
    _, report = load_preferences(ds, tok, cache_dir=tmp_path, progress=False)
    key = Path(report.cache_path).stem
    gone, mine = dead_pid(), os.getpid()
    minute, day = 60.0, 24 * 3600.0
    files = {  # name: (seconds since last write, removed?)
        f"{key}.epsdpo.epsdpo-tmp{gone}": (2 * minute, True),  # the store write of a killed process (old name)
        f"{key}.epsdpo.epsdpo-tmp{gone}.1f-0a3b4c5d": (2 * minute, True),  # the same, named as saves name it now
        f".{key}.json.epsdpo-tmp{gone}.x1y2z3": (2 * minute, True),  # its report write
        f"other.epsdpo.epsdpo-tmp{gone}": (5.0, False),  # recent: its writer may be on another machine
        f"other.epsdpo.epsdpo-tmp{mine}": (2 * minute, False),  # a live writer
        f"old.epsdpo.epsdpo-tmp{mine}": (2 * day, True),  # anything a day old
        "notes.epsdpo-tmp.txt": (2 * day, False),  # not one of ours
    }
    now = time.time()
    for name, (age, _) in files.items():
        (tmp_path / name).write_bytes(b"partial")
        os.utime(tmp_path / name, (now - age, now - age))
    assert load_preferences(ds, tok, cache_dir=tmp_path, progress=False)[1].cache_hit  # a load cleans
    left = {p.name for p in tmp_path.iterdir()}
    for name, (_, removed) in files.items():
        assert (name not in left) == removed, name


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_an_unwritable_cache_dir_loads_without_caching(where: str, tok: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    cache_dir = blocker if where == "a file" else blocker / "cache"
    ds = datasets.Dataset.from_list([good_row(i) for i in range(3)])
    with pytest.warns(UserWarning, match="without caching"):
        store, report = load_preferences(ds, tok, cache_dir=cache_dir, progress=False)
    assert len(store) == 3 and report.cache_path is None and not report.cache_hit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not load_preferences(ds, tok, cache_dir=cache_dir, progress=False)[1].cache_hit


# --------------------------------------------------------------------------------------------
# `epsdpo prepare`: the same bad rows, as one line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, flags, message", [
    (b'{"prompt": "p", "chosen": ' + b"7" * 5000 + b', "rejected": " b"}', [], "holds an integer of 5,000 digits"),
    (line({**good_row(1), "prompt": "x" * 2000}), ["--max_row_bytes", "1000"], "2,076 bytes, over the row limit of 1,000"),
], ids=["5000-digit integer", "oversize row"])
def test_prepare_names_a_bad_row_in_one_line_and_skips_it_when_asked(bad, flags, message, tok, tmp_path, capsys):
    from epsdpo.cli import main

    tok.save_pretrained(tmp_path / "tok")
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([line(good_row(0)), bad, line(good_row(2))]) + b"\n")
    argv = ["prepare", str(path), "--tokenizer", str(tmp_path / "tok"), "--cache_dir", "disabled", *flags]
    with pytest.raises(SystemExit, match=rf"^epsdpo prepare: rows.jsonl: row 1 \(line 2\): {message}"):
        main(argv)  # before: a bare ValueError and its traceback, naming no file
    assert main([*argv, "--skip_invalid"]) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--max_length", "--max_prompt_length", "--max_completion_length", "--max_row_bytes"])
@pytest.mark.parametrize("value", ["0", str(10**30)])
def test_prepare_refuses_an_out_of_range_size_as_a_usage_error(flag, value, tmp_path, capsys):
    from epsdpo.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["prepare", str(tmp_path / "rows.jsonl"), "--tokenizer", "tok", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"error: argument {flag}: {flag[2:]}={value} is invalid" in err.splitlines()[-1]
