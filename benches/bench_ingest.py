"""Raw rows → ready preference data: epsdpo's `load_preferences` against TRL's DPO preprocessing.

Both sides get the same `datasets.Dataset` of synthetic conversational pairs (half with a system
message, a third with a multi-turn prompt; text drawn from the tokenizer's whole-word vocabulary
with a Zipf law, like natural text, and 5% of the texts with some non-ASCII) and the same SmolLM2-135M-Instruct tokenizer, in the same run:

- TRL: `DPOTrainer._prepare_dataset` of the installed TRL (prompt, prompt + chosen and prompt +
  rejected through the chat template and tokenized per row, in `Dataset.map`), with its default
  single process; it needs no model, so it runs on a stub trainer.
- ours, cold: `load_preferences(..., cache_dir=None)` — validation, chat template, tokenization,
  the prefix check, the store, and the report (length percentiles, padding per layout).
- ours, cache hit: a second call with a cache directory (fingerprinting the data and tokenizer,
  memory-mapping the store).

Each round runs all three back to back; the table gives the median time of each over the rounds,
and the speed-up as the median of the per-round ratios, which holds up better than a ratio of
medians when other jobs load the machine unevenly. The bench also checks that both produce the same tokens for every pair, and with `--write` records the
results in docs/data.md (between the bench markers).

    python benches/bench_ingest.py --pairs 10000 --repeats 3 --write docs/data.md
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

NON_ASCII = ("Café au lait — très bien.", "“Quoted,” she said.", "Naïve façade…", "Zürich, 25 °C.", "日本語のテキスト。")
START, END = "<!-- bench_ingest:start -->", "<!-- bench_ingest:end -->"


def vocabulary(tokenizer: Any) -> list[str]:
    """Lowercase whole words that are single tokens, in merge order (≈ frequency order)."""
    vocab = tokenizer.get_vocab()
    words = [(i, w[1:]) for w, i in vocab.items() if w.startswith("Ġ") and w[1:].isascii() and w[1:].isalpha() and w[1:].islower()]
    return [w for _, w in sorted(words)]


class TextGen:
    def __init__(self, words: list[str], seed: int) -> None:
        self.rng = random.Random(seed)
        self.words = words
        self.cum = list(np.cumsum(1.0 / np.arange(1, len(words) + 1)))  # Zipf, exponent 1

    def text(self, lo: int, hi: int) -> str:
        n = self.rng.randint(lo, hi)
        words = self.rng.choices(self.words, cum_weights=self.cum, k=n)
        out, start = [], 0
        while start < n:  # sentences of 4-18 words
            end = min(n, start + self.rng.randint(4, 18))
            out.append(" ".join(words[start:end]).capitalize() + self.rng.choice(".....?!"))
            start = end
        if self.rng.random() < 0.05:  # some text is not pure ASCII: accents, dashes, curly quotes
            out.insert(self.rng.randrange(len(out) + 1), self.rng.choice(NON_ASCII))
        return " ".join(out)


def make_rows(tokenizer: Any, n: int, seed: int = 0) -> list[dict[str, Any]]:
    gen = TextGen(vocabulary(tokenizer), seed)
    rows = []
    for _ in range(n):
        prompt = []
        if gen.rng.random() < 0.5:
            prompt.append({"role": "system", "content": gen.text(5, 40)})
        turns = gen.rng.choice((1, 1, 2))
        for t in range(turns):
            if t:
                prompt.append({"role": "assistant", "content": gen.text(10, 80)})
            prompt.append({"role": "user", "content": gen.text(10, 300)})
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": gen.text(10, 350)}],
            "rejected": [{"role": "assistant", "content": gen.text(10, 350)}],
        })  # fmt: skip
    return rows


def load_tokenizer() -> Any:
    from epsdpo.models import load_tokenizer, smollm2_gguf_path

    try:
        return load_tokenizer(smollm2_gguf_path())
    except FileNotFoundError as error:
        sys.exit(str(error))


def trl_prepare(dataset: Any, tokenizer: Any) -> Any:
    """TRL's own DPO dataset preparation, exactly as DPOTrainer.__init__ calls it."""
    from trl import DPOConfig, DPOTrainer

    class Stub:  # _prepare_dataset reads only self._tokenizer
        _tokenizer = tokenizer

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, use_cpu=True, bf16=False, report_to="none", max_length=None)
        return DPOTrainer._prepare_dataset(Stub(), dataset, tokenizer, args, "train")


def same_tokens(store: Any, prepared: Any) -> int:
    """Number of pairs whose tokens differ between our store and TRL's output."""
    ids = store.ids()
    cols = prepared.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])[:]
    bad = 0
    for k in range(len(store)):
        row = int(ids[k])
        p, c, r = store[k]
        if (p.tolist(), c.tolist(), r.tolist()) != (cols["prompt_ids"][row], cols["chosen_ids"][row], cols["rejected_ids"][row]):
            bad += 1
    return bad + abs(len(store) - len(prepared))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", type=Path, help="update the results section of this markdown file")
    a = ap.parse_args()

    import datasets
    import trl
    import transformers

    from epsdpo.data import load_preferences

    datasets.disable_caching()  # TRL's map would otherwise reuse its own cached result
    datasets.disable_progress_bars()
    tokenizer = load_tokenizer()
    dataset = datasets.Dataset.from_list(make_rows(tokenizer, a.pairs, a.seed))

    trl_s, cold_s, hit_s = [], [], []
    for rep in range(a.repeats):
        t = time.perf_counter()
        prepared = trl_prepare(dataset, tokenizer)
        trl_s.append(time.perf_counter() - t)

        t = time.perf_counter()
        store, report = load_preferences(dataset, tokenizer, cache_dir=None, progress=False)
        cold_s.append(time.perf_counter() - t)

        with tempfile.TemporaryDirectory() as cache:
            load_preferences(dataset, tokenizer, cache_dir=cache, progress=False)
            t = time.perf_counter()
            hit, hit_report = load_preferences(dataset, tokenizer, cache_dir=cache, progress=False)
            hit_s.append(time.perf_counter() - t)
            assert hit_report.cache_hit and len(hit) == len(store)
        print(f"round {rep + 1}: TRL {trl_s[-1]:.2f} s, ours cold {cold_s[-1]:.2f} s, cache hit {hit_s[-1]:.3f} s", flush=True)

    differ = same_tokens(store, prepared)
    trl_m, cold_m, hit_m = (statistics.median(x) for x in (trl_s, cold_s, hit_s))
    cold_x = statistics.median(t / c for t, c in zip(trl_s, cold_s))
    hit_x = statistics.median(t / h for t, h in zip(trl_s, hit_s))
    n = a.pairs
    lens = report.lengths
    table = "\n".join([
        "| preprocessing | seconds (median) | pairs/s | speed-up vs TRL |",
        "| --- | ---: | ---: | ---: |",
        f"| TRL {trl.__version__} `DPOTrainer._prepare_dataset` | {trl_m:.2f} | {n / trl_m:,.0f} | 1× |",
        f"| epsdpo `load_preferences`, cold (no cache) | {cold_m:.2f} | {n / cold_m:,.0f} | **{cold_x:.1f}×** |",
        f"| epsdpo `load_preferences`, cache hit | {hit_m:.3f} | {n / hit_m:,.0f} | {hit_x:.0f}× |",
    ])  # fmt: skip
    rounds = "; ".join(f"{t:.1f} s vs {c:.2f} s ({t / c:.1f}×)" for t, c in zip(trl_s, cold_s))
    body = f"""{START}
{n:,} synthetic conversational pairs (prompt {lens['prompt']['p50']:.0f} tokens median, {lens['prompt']['max']:.0f} max;
completions {lens['chosen']['p50']:.0f} median), SmolLM2-135M-Instruct tokenizer and chat template,
{a.repeats} rounds on {os.cpu_count()} CPU cores ({platform.machine()}, shared with other jobs),
transformers {transformers.__version__}, datasets {datasets.__version__}:

{table}

Rounds (TRL vs ours, cold): {rounds}.
Tokens: {'identical to TRL for every pair' if differ == 0 else f'{differ} pairs differ from TRL'}.
The cold time covers validation, the chat template, tokenization, the prefix check, building the
store and the report (length percentiles, padding per layout). Reproduce with:

```bash
python benches/bench_ingest.py --pairs {n} --repeats {a.repeats} --seed {a.seed} --write docs/data.md
```
{END}"""
    print(body)
    if a.write:
        old = a.write.read_text(encoding="utf-8") if a.write.exists() else ""
        if START in old and END in old:
            new = old[: old.index(START)] + body + old[old.index(END) + len(END) :]
        else:
            new = old.rstrip() + ("\n\n" if old else "") + "## Benchmark: raw rows to a ready store\n\n" + body + "\n"
        a.write.write_text(new, encoding="utf-8")
    if differ:
        sys.exit(f"{differ} pairs differ from TRL's tokens")


if __name__ == "__main__":
    main()
