"""Streaming ingestion: every kind of source is read batch by batch into the store, and gives the
store the whole-dataset path gives.

The oracle is `load_preferences` on a ``datasets.Dataset`` of the same rows read in one batch (one
append of everything, which is what ingestion did before it streamed): the store file's bytes, the
pair ids and the report must be the same for a list, a generator, an ``IterableDataset``, a JSON Lines
file, a Parquet file and a folder of data files, read in small batches, bad rows included. Memory is
checked in a subprocess: ingesting four times the rows must cost about the tokens, not the rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

datasets = pytest.importorskip("datasets")

from test_data import build_tokenizer, conv_rows  # noqa: E402

from epsdpo.data import DataSourceError, InvalidRowError, load_preferences  # noqa: E402
from epsdpo.data.sources import FolderSplit  # noqa: E402

# Fields of the report that say where and how fast the data came, not what it is.
CIRCUMSTANCES = ("source", "seconds", "fingerprint", "cache_path", "cache_hit")
SMALL_BATCH = 37  # rows per batch: a few hundred rows make many batches, and the last one short


def standard_rows(n: int = 300, bad: bool = True) -> list[dict[str, Any]]:
    """Standard rows, with (``bad``) bad ones among them (identical, empty, missing), all of one
    Arrow type per column."""
    rows = []
    for i in range(n):
        row = {"prompt": f"Question {i}: the cat sat on which mat?", "chosen": f" The red mat, {i}.", "rejected": " No idea."}
        if not bad:
            pass
        elif i % 50 == 7:
            row["rejected"] = row["chosen"]  # identical_completions
        elif i % 50 == 19:
            row["chosen"] = " "  # empty_completion
        elif i % 50 == 33:
            row["prompt"] = None  # missing_field
        rows.append(row)
    return rows


def conversational_rows(n: int = 240) -> list[dict[str, Any]]:
    rows = conv_rows(n, seed=3)
    for i in range(5, n, 40):
        rows[i]["rejected"] = rows[i]["chosen"]  # identical_completions
    return rows


def reference(rows: list[dict[str, Any]], tokenizer: Any) -> tuple[bytes, dict[str, Any]]:
    """Today's path: a Dataset of the rows, in one batch."""
    store, report = load(datasets.Dataset.from_list(rows), tokenizer, batch_size=len(rows))
    return store_bytes(store), what(report)


def load(source: Any, tokenizer: Any, **kw: Any) -> Any:
    kw.setdefault("cache_dir", None)
    kw.setdefault("progress", False)
    kw.setdefault("skip_invalid", True)
    return load_preferences(source, tokenizer, **kw)


def store_bytes(store: Any) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.store"
        store.save(path)
        return path.read_bytes()


def what(report: Any) -> dict[str, Any]:
    data = report.to_dict()
    for key in CIRCUMSTANCES:
        data.pop(key, None)
    return data


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=50)  # several row groups
    return path


def sources(kind: str, rows: list[dict[str, Any]], tmp_path: Path) -> Any:
    if kind == "list":
        return rows
    if kind == "generator":
        return (row for row in rows)
    if kind == "Dataset":
        return datasets.Dataset.from_list(rows)
    if kind == "IterableDataset":
        return datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=3)
    if kind == "IterableDataset.from_generator":
        return datasets.IterableDataset.from_generator(lambda: iter(rows))
    if kind == "jsonl":
        return write_jsonl(tmp_path / "pairs.jsonl", rows)
    if kind == "load_dataset(streaming=True)":  # TRL's way to stream: an IterableDatasetDict, its train split read
        path = write_jsonl(tmp_path / "pairs.jsonl", rows)
        return datasets.load_dataset("json", data_files={"train": str(path)}, streaming=True)
    if kind == "parquet":
        return write_parquet(tmp_path / "pairs.parquet", rows)
    if kind == "folder":  # train split in two shards, as datasets names them
        half = len(rows) // 2
        write_jsonl(tmp_path / "f" / "data" / "train-00000-of-00002.jsonl", rows[:half])
        write_jsonl(tmp_path / "f" / "data" / "train-00001-of-00002.jsonl", rows[half:])
        return tmp_path / "f"
    raise AssertionError(kind)


KINDS = ["list", "generator", "Dataset", "IterableDataset", "IterableDataset.from_generator", "load_dataset(streaming=True)",
         "jsonl", "parquet", "folder"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows_of", [standard_rows, conversational_rows], ids=["standard", "conversational"])
def test_streamed_sources_give_the_stores_of_the_whole_dataset_path(kind: str, rows_of: Any, tmp_path: Path) -> None:
    tokenizer = build_tokenizer(adds_bos=True)
    rows = rows_of()
    expected_bytes, expected_report = reference(rows, tokenizer)
    store, report = load(sources(kind, rows, tmp_path), tokenizer, batch_size=SMALL_BATCH)
    assert store_bytes(store) == expected_bytes
    assert what(report) == expected_report
    assert report.num_rows == len(rows) and report.skipped  # the bad rows were met and counted, in every batch


def test_a_generator_is_read_once_batch_by_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are pulled as batches need them, not gathered first: by the time the second batch is
    tokenized, the generator has handed out no more than the peeked head and that batch."""
    tokenizer = build_tokenizer()
    pulled = []

    def rows():
        for i, row in enumerate(standard_rows(3000)):
            pulled.append(i)
            yield row

    from epsdpo.data import ingest

    seen_at_append = []
    real_tokenize = ingest._tokenize_batch

    def spy(*args: Any) -> None:
        seen_at_append.append(len(pulled))
        real_tokenize(*args)

    monkeypatch.setattr(ingest, "_tokenize_batch", spy)
    _, report = load(rows(), tokenizer, batch_size=100)
    assert report.num_rows == 3000
    # The head read to learn the columns is 1000 rows; after it, one batch at a time.
    assert seen_at_append[0] == 1000 and seen_at_append[-1] == 3000
    assert all(b - a <= 100 for a, b in zip(seen_at_append[10:], seen_at_append[11:]))
    from epsdpo.data.sources import open_source

    src = open_source(iter(standard_rows(3)), None)
    assert sum(len(b["chosen"]) for b in src.batches(2)) == 3
    with pytest.raises(DataSourceError, match="already read: a stream can be read once"):
        list(src.batches(2))


def test_a_bad_row_past_the_first_batch_is_named_by_its_line_and_file(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    rows = standard_rows(300, bad=False)
    rows[250]["chosen"] = 5
    lines = [json.dumps(r) for r in rows]
    lines.insert(100, "")  # a blank line: not a row, but it moves the line numbers on
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidRowError, match=r"^pairs\.jsonl: row 250 \(line 252\): 'chosen' is a int"):
        load(path, tokenizer, batch_size=SMALL_BATCH, skip_invalid=False)
    write_jsonl(tmp_path / "f" / "data" / "train-00000-of-00002.jsonl", rows[:200])
    write_jsonl(tmp_path / "f" / "data" / "train-00001-of-00002.jsonl", rows[200:])  # rows go on in the second file
    with pytest.raises(InvalidRowError, match=r"^f\['train'\]: row 250 \(.*f/data/train-00001-of-00002\.jsonl, line 51\): 'chosen' is a int"):
        load(tmp_path / "f", tokenizer, batch_size=SMALL_BATCH, skip_invalid=False)


@pytest.mark.parametrize(("source", "message"), [
    ([], r"list of rows: no preference pairs to train on \(the source has no rows\)"),
    (iter(()), r"rows of a tuple_iterator: no preference pairs to train on \(the source has no rows\)"),
    (["prompt,chosen,rejected"], r"rows must be mappings of column names to values \(a dict per row\); the first is a str"),
    ({"prompt": ["q"], "chosen": ["a"], "rejected": ["b"]}, r"source must be a datasets\.Dataset, .* got dict"),
])
def test_an_iterable_that_holds_no_rows_is_refused_in_one_line(source: Any, message: str) -> None:
    with pytest.raises(DataSourceError, match=message):
        load(source, build_tokenizer())


# --- the cache ------------------------------------------------------------------------------


def test_a_stream_is_fingerprinted_as_it_is_read_and_a_list_of_the_same_rows_hits_its_entry(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    rows = standard_rows(120)
    streamed, report = load((r for r in rows), tokenizer, cache_dir=tmp_path / "cache")
    assert not report.cache_hit and report.fingerprint and Path(report.cache_path).is_file()
    again, hit = load(list(rows), tokenizer, cache_dir=tmp_path / "cache")
    assert hit.cache_hit and hit.fingerprint == report.fingerprint
    assert store_bytes(again) == store_bytes(streamed)
    changed = [dict(r) for r in rows]
    changed[-1]["rejected"] = " Something else entirely."
    _, other = load((r for r in changed), tokenizer, cache_dir=tmp_path / "cache")
    assert other.fingerprint != report.fingerprint  # the last row counts too: the whole stream is hashed


def test_files_keep_their_fingerprint(tmp_path: Path) -> None:
    """A file's key is its bytes' hash, as before streaming: existing cache entries stay valid."""
    from epsdpo.data import cache

    tokenizer = build_tokenizer()
    path = write_jsonl(tmp_path / "pairs.jsonl", standard_rows(60))
    _, first = load(path, tokenizer, cache_dir=tmp_path / "cache")
    key = cache.fingerprint(
        data=cache.hash_file(path), tokenizer=cache.tokenizer_hash(tokenizer), chat_template=tokenizer.chat_template,
        chat_template_kwargs={}, settings={"max_length": None, "max_prompt_length": None, "truncation_mode": "keep_end",
                                           "skip_invalid": True},
    )
    assert first.fingerprint == key
    _, second = load(path, tokenizer, cache_dir=tmp_path / "cache")
    assert second.cache_hit


# --- dataset folders ------------------------------------------------------------------------


def test_a_folder_of_split_files_reads_its_splits_by_file_name(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    rows = standard_rows(90)
    folder = tmp_path / "pairs"
    write_jsonl(folder / "train.jsonl", rows[:60])
    write_jsonl(folder / "test.jsonl", rows[60:80])
    write_parquet(folder / "validation.parquet", rows[80:])
    (folder / "README.md").write_text("# pairs\n")
    expected = {name: reference(part, tokenizer)[0] for name, part in
                (("train", rows[:60]), ("test", rows[60:80]), ("validation", rows[80:]))}
    train, report = load(folder, tokenizer)  # no split: train, as datasets.load_dataset(folder) gives
    assert store_bytes(train) == expected["train"] and report.source == "pairs['train']"
    for name in ("train", "test", "validation"):
        assert store_bytes(load(folder, tokenizer, split=name)[0]) == expected[name]
        assert store_bytes(load(FolderSplit(folder, name), tokenizer)[0]) == expected[name]
    with pytest.raises(DataSourceError, match=r"has no split 'dev'; it has \['train', 'validation', 'test'\]"):
        load(folder, tokenizer, split="dev")


def test_a_folder_of_one_data_file_is_its_train_split(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    write_jsonl(tmp_path / "pairs" / "anything.jsonl", standard_rows(20))
    store, report = load(tmp_path / "pairs", tokenizer)
    assert len(store) == report.num_pairs and report.num_rows == 20


@pytest.mark.parametrize(("files", "message"), [
    ({}, r"neither one written by datasets' save_to_disk nor one of data files .*; it holds no files"),
    ({"notes/readme.md": "hi"}, r"split 'train' has files of no supported type: notes/readme\.md"),
    ({"train.csv": "prompt,chosen,rejected\n"}, r"split 'train' has files of no supported type: train\.csv"),
    ({"train.jsonl": "{}\n", "train.parquet": None}, r"split 'train' mixes Parquet and JSON files \(train\.jsonl, train\.parquet\)"),
    ({"train_test.jsonl": "{}\n"}, r"the file train_test\.jsonl belongs to the splits \['train', 'test'\] by its name"),
    ({"test.jsonl": "{}\n", "validation.jsonl": "{}\n"}, r"\(splits by file name: validation: validation\.jsonl; test: test\.jsonl\) has splits \['validation', 'test'\]; choose one with split="),
])
def test_an_unreadable_or_ambiguous_folder_is_refused_naming_its_files(tmp_path: Path, files: dict[str, Any], message: str) -> None:
    folder = tmp_path / "pairs"
    folder.mkdir()
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            write_parquet(path, standard_rows(3))
        else:
            path.write_text(text)
    with pytest.raises(DataSourceError, match=message):
        load(folder, build_tokenizer())


def test_the_cli_trains_on_a_split_of_a_folder_of_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`epsdpo train` with dataset_name=folder and its train/test splits picked by file name, as a
    TRL YAML names a dataset folder."""
    import epsdpo.trainer
    from epsdpo.cli import main

    calls = []

    class Recording:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            calls.append((args, kwargs))
            self.state = type("S", (), {"global_step": 0})()
            self.kl = type("K", (), {"beta": 0.1})()
            self.dist = type("D", (), {"is_main": True})()

        def train(self, **kwargs: Any) -> None:
            pass

    monkeypatch.setattr(epsdpo.trainer, "Trainer", Recording)
    rows = standard_rows(30)
    write_jsonl(tmp_path / "pairs" / "train.jsonl", rows[:20])
    write_jsonl(tmp_path / "pairs" / "test.jsonl", rows[20:])
    (tmp_path / "c.yaml").write_text(f"model_name_or_path: m\ndataset_name: {tmp_path / 'pairs'}\n"
                                     "dataset_train_split: train\ndataset_test_split: test\neval_strategy: steps\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    args, kwargs = calls[-1]
    tokenizer = build_tokenizer()
    train = args[2] if len(args) > 2 else kwargs["train_dataset"]
    assert store_bytes(load(train, tokenizer)[0]) == reference(rows[:20], tokenizer)[0]
    assert store_bytes(load(kwargs["eval_dataset"], tokenizer)[0]) == reference(rows[20:], tokenizer)[0]
    (tmp_path / "pairs" / "test.jsonl").unlink()
    with pytest.raises(SystemExit, match=r"dataset_test_split='test'.*has no split 'test'; it has \['train'\]"):
        main(["train", str(tmp_path / "c.yaml")])


# --- memory ---------------------------------------------------------------------------------

MEMORY_PROBE = r"""
import json, os, random, sys
from transformers import PreTrainedTokenizerFast
from epsdpo.data import load_preferences

kind, n, tokenizer_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
words = "the cat sat on a mat and the dog ran over hills while birds sang of rain in spring".split()

def rows():
    rng = random.Random(0)
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))
    for _ in range(n):
        yield {"prompt": text(60) + "?", "chosen": " " + text(40) + ".", "rejected": " " + text(40) + "!"}

def status(field):  # this process's own figures: ru_maxrss would count the parent's RSS before exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

warm = os.path.join(sys.argv[4], "warm.jsonl")
with open(warm, "w") as f:
    f.writelines(json.dumps({"prompt": f"a {i}", "chosen": " b", "rejected": " c"}) + "\n" for i in range(200))
load_preferences(warm, tokenizer, cache_dir=None, progress=False)  # imports and first-call costs, before measuring
if kind == "jsonl":
    source = os.path.join(sys.argv[4], f"rows{n}.jsonl")
    with open(source, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows())
else:
    source = rows()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM restarts from the RSS now: the peak measured is the ingestion's
before = status("VmRSS")
store, _ = load_preferences(source, tokenizer, cache_dir=None, progress=False, batch_size=500)
print(json.dumps({"growth": status("VmHWM") - before, "token_bytes": 4 * store.num_tokens + 32 * len(store)}))
"""


def _ingest_in_subprocess(kind: str, n: int, tmp_path: Path) -> dict[str, int]:
    """Ingest n rows in a fresh process (importing neither torch nor the tests); its RSS growth and the store's bytes."""
    tokenizer_dir = tmp_path / "tokenizer"
    if not tokenizer_dir.is_dir():
        build_tokenizer().save_pretrained(tokenizer_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parents[1] / "python"), os.environ.get("PYTHONPATH")) if p),
           # glibc then maps every large buffer, so a growing one is moved by mremap instead of copied: the
           # figures are the data's, not a realloc caught halfway (a copy briefly holds a buffer twice)
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, kind, str(n), str(tokenizer_dir), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set size from /proc")
@pytest.mark.parametrize("kind", ["jsonl", "generator"])
def test_memory_grows_with_the_tokens_not_the_rows(kind: str, tmp_path: Path) -> None:
    """Four times the rows cost about four times the tokens (the store itself) and no more: the
    rows, their parsed Python objects and their per-batch arrays are freed batch by batch. Measured
    ~1.0-1.3x the tokens' bytes (RSS noise of a few MB on ~10 MB); before streaming, a JSON Lines file
    was parsed whole and the batches concatenated at the end: ~3.8x."""
    n = 2000
    small, large = (_ingest_in_subprocess(kind, rows, tmp_path) for rows in (n, 4 * n))
    extra_tokens = large["token_bytes"] - small["token_bytes"]
    extra_memory = large["growth"] - small["growth"]
    assert extra_tokens > 8 << 20
    assert extra_memory < 1.75 * extra_tokens, (small, large)


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["generator", "IterableDataset", "folder"])
def test_a_trainer_trains_on_a_stream(kind: str, tmp_path: Path) -> None:
    """TRL accepts an IterableDataset as train_dataset; so does the Trainer (and a generator, and a
    folder of files), ingesting it into the store the list of the same rows gives, then training."""
    from tiny import tiny_llama

    from epsdpo.config import TrainConfig
    from epsdpo.trainer import Trainer

    tokenizer = build_tokenizer()
    rows = standard_rows(40, bad=False)
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, max_length=64,
                         dataset_cache_dir="disabled", progress=False, plots=False)
    trainer = Trainer(tiny_llama(0, vocab=len(tokenizer)), config, train_dataset=sources(kind, rows, tmp_path),
                      tokenizer=tokenizer)
    assert store_bytes(trainer.train_store) == reference(rows, tokenizer)[0]
    trainer.train()
    assert trainer.state.global_step == 2
