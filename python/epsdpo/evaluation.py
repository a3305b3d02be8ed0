"""Held-out generation scored by a programmatic gold reward (the demo's instruction checker)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


def _generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[list[dict[str, str]]], batch_size: int, **options: Any
) -> Iterator[tuple[list[int], list[int]]]:
    """(prompt ids, generated ids) per chat prompt (a message list): each prompt is templated and
    tokenized, then generated from by `_generate_ids`."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    yield from _generate_ids(model, ids, tokenizer.pad_token_id, batch_size, **options)


def _generate_ids(
    model: nn.Module, prompt_ids: Sequence[list[int]], pad: int, batch_size: int, **options: Any
) -> Iterator[tuple[list[int], list[int]]]:
    """(prompt ids, generated ids) per tokenized prompt, batched with left padding; the generated ids
    run to `max_new_tokens` or the batch's end, padding included."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompt_ids), batch_size):
            ids = [list(x) for x in prompt_ids[start : start + batch_size]]
            width = max(map(len, ids))
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=model.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=model.device)
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=mask, pad_token_id=pad, **options)
            yield from zip(ids, out[:, width:].tolist())
    finally:
        model.train(was_training)


def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to chat prompts (message lists)."""
    return [
        tokenizer.decode(generated, skip_special_tokens=True).strip()
        for _, generated in _generate(model, tokenizer, prompts, batch_size, max_new_tokens=max_new_tokens, do_sample=False)
    ]


def sample_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
) -> list[tuple[list[int], list[int]]]:
    """One answer per chat prompt sampled from the model's own distribution (temperature 1, no top-k
    or top-p, so the samples estimate expectations under π), as (prompt ids, answer ids); an answer
    ends at its first stop token (the tokenizer's or the model's EOS), which it keeps, or after
    `max_new_tokens`."""
    torch.manual_seed(seed)
    return _cut_at_stop(_generate(model, tokenizer, prompts, batch_size, max_new_tokens=max_new_tokens, **_NEUTRAL),
                        _stop_ids(model, tokenizer))


def sample_completions_from_ids(
    model: nn.Module,
    prompt_ids: Sequence[list[int]],
    *,
    pad_token_id: int,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
) -> list[tuple[list[int], list[int]]]:
    """`sample_completions` for prompts already tokenized (no chat template, no tokenizer): what a
    model trained on token ids, such as a synthetic task's, is evaluated with. Answers stop at the
    model's EOS."""
    torch.manual_seed(seed)
    generated = _generate_ids(model, prompt_ids, pad_token_id, batch_size, max_new_tokens=max_new_tokens, **_NEUTRAL)
    return _cut_at_stop(generated, _stop_ids(model, None))


# Every logits processor a model's generation_config may switch on is neutralised: the samples must
# come from π itself, or the KL estimated from them is biased.
_NEUTRAL: dict[str, Any] = dict(
    do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0,
    eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0, min_new_tokens=None,
    bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
)


def _cut_at_stop(
    generated: Iterator[tuple[list[int], list[int]]], stops: set[int]
) -> list[tuple[list[int], list[int]]]:
    """Each answer up to and including its first stop token (or whole, if it has none)."""
    out = []
    for prompt_ids, answer in generated:
        end = next((i for i, token in enumerate(answer) if token in stops), None)
        out.append((prompt_ids, answer if end is None else answer[: end + 1]))
    return out


def _stop_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Every token that ends generation: the tokenizer's EOS and the model's (often a list)."""
    ids = {getattr(tokenizer, "eos_token_id", None)}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids if i is not None}


@torch.no_grad()
def sequence_log_ratios(
    policy: nn.Module, reference: nn.Module, sequences: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
) -> list[float]:
    """log π(y|x) − log π_ref(y|x) for each (prompt ids, answer ids); averaged over samples y ~ π it
    estimates the sequence-level KL(π‖π_ref). Scored by the training path (store, collator, kernel)."""
    from epsdpo._core import Collator, PreferenceStore
    from epsdpo.scoring import batch_logps

    vocab = policy.get_output_embeddings().weight.shape[0]
    store = PreferenceStore(vocab_size=vocab)
    for prompt_ids, answer in sequences:
        # Scored as "chosen"; the rejected side is a one-token placeholder whose score is ignored (a copy
        # of the answer would make a pair the collator drops, having nothing to learn)
        store.add_pair(prompt_ids, answer, [0] if answer != [0] else [1])
    collator = Collator("padded")
    ratios: list[float] = []
    was_training = policy.training
    policy.eval()
    try:
        for start in range(0, len(store), batch_size):
            batch = collator(store, list(range(start, min(start + batch_size, len(store)))))
            seq = batch_logps(policy, reference, batch, 0.0)
            chosen = len(batch["pair_ids"])
            ratios += (seq.policy[:chosen] - seq.reference[:chosen]).double().tolist()
    finally:
        policy.train(was_training)
    return ratios


@torch.no_grad()
def sequence_kls(
    policy: nn.Module, reference: nn.Module, sequences: Sequence[tuple[list[int], list[int]]], batch_size: int = 64,
) -> list[float]:
    """Σ_t KL(π(·|x, y<t) ‖ π_ref(·|x, y<t)) over each answer's positions, for (prompt ids, answer ids)
    sampled from π. Averaged over the samples it estimates the sequence-level KL(π‖π_ref), as the mean
    of `sequence_log_ratios` does, with lower variance: each position's expectation over the next
    token is taken exactly instead of through the one token sampled (the chain rule of KL makes the
    sum unbiased). It needs full logits, so it suits small vocabularies or small batches."""
    out: list[float] = []
    was_training = policy.training
    policy.eval()
    try:
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            rows = [list(p) + list(a) for p, a in chunk]
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=policy.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=policy.device)
            logp = torch.log_softmax(policy(input_ids=ids, attention_mask=mask).logits.double(), -1)
            logq = torch.log_softmax(reference(input_ids=ids, attention_mask=mask).logits.double(), -1)
            per_position = (logp.exp() * (logp - logq)).sum(-1)  # KL of the next-token distributions
            for row, (prompt, answer) in enumerate(chunk):
                # logits at position i predict token i + 1: the answer's tokens are predicted from
                # positions len(prompt) − 1 … len(prompt) + len(answer) − 2
                first = len(prompt) - 1
                out.append(float(per_position[row, first : first + len(answer)].sum()))
    finally:
        policy.train(was_training)
    return out


def score_answers(answers: Sequence[str], specs: Sequence[Any], scorer: Callable[[str, Any], float]) -> list[float]:
    return [float(scorer(a, s)) for a, s in zip(answers, specs, strict=True)]


def win_rate(after: Sequence[float], before: Sequence[float]) -> float:
    """Fraction of prompts where `after` beats `before`, ties counting half."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(after, before, strict=True))
    return wins / max(len(after), 1)
