"""Held-out generation scored by a programmatic gold reward (the demo's instruction checker)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to chat prompts (message lists), batched with left padding."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
                     for p in prompts[start : start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [a.strip() for a in answers]


def score_answers(answers: Sequence[str], specs: Sequence[Any], scorer: Callable[[str, Any], float]) -> list[float]:
    return [float(scorer(a, s)) for a, s in zip(answers, specs, strict=True)]


def win_rate(after: Sequence[float], before: Sequence[float]) -> float:
    """Fraction of prompts where `after` beats `before`, ties counting half."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(after, before, strict=True))
    return wins / max(len(after), 1)
