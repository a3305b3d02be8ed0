"""Tiny random Llama models and a toy preference task, for trainer tests (no network)."""

from __future__ import annotations

import numpy as np
import torch

import epsdpo

VOCAB = 64


def tiny_llama(seed: int = 0, vocab: int = VOCAB, tie: bool = False, attention_dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tie, attn_implementation="sdpa", attention_dropout=attention_dropout,
    )
    return LlamaForCausalLM(config)


def toy_store(n: int = 64, seed: int = 0) -> epsdpo.PreferenceStore:
    """Prompts of random tokens; the chosen answer repeats the prompt's first token, the rejected
    answer is random: a preference a tiny model can learn within a few dozen steps."""
    rng = np.random.default_rng(seed)
    store = epsdpo.PreferenceStore(vocab_size=VOCAB)
    for _ in range(n):
        prompt = rng.integers(2, VOCAB, rng.integers(3, 9)).tolist()
        chosen = [prompt[0]] * int(rng.integers(2, 6)) + [1]
        rejected = rng.integers(2, VOCAB, rng.integers(2, 7)).tolist() + [1]
        store.add_pair(prompt, chosen, rejected)
    return store
