"""A deliberately naive ε-DPO written straight from docs/algorithm.md ('The objective', 'The step rule'),
used as the reference in tests and as the official-code-style baseline in benches/. It materialises
full [N, V] logits and runs every log-softmax with autograd on, as the official implementation does."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def head_logits(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """Full logits [N, V] of a linear head with optional scale and soft-cap."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def token_logps(policy_logits: Tensor, ref_logits: Tensor, labels: Tensor, epsilon: float) -> dict[str, Tensor]:
    """Label log-probs [N] under policy, reference, relaxed and tightened distributions."""

    def at_labels(logits: Tensor) -> Tensor:
        return torch.log_softmax(logits, dim=-1).gather(-1, labels[:, None]).squeeze(-1)

    return {
        "policy": at_labels(policy_logits),
        "reference": at_labels(ref_logits),
        "relaxed": at_labels((1 + epsilon) * policy_logits - epsilon * ref_logits),
        "tightened": at_labels((1 - epsilon) * policy_logits + epsilon * ref_logits),
    }


def per_sequence(values: Tensor, target_sequence: Tensor, num_sequences: int) -> Tensor:
    """Per-sequence sums through a one-hot matrix (independent of index_add)."""
    onehot = torch.zeros(num_sequences, values.shape[0], dtype=values.dtype)
    onehot[target_sequence, torch.arange(values.shape[0])] = 1
    return onehot @ values


def steps(z: list[float], z_relaxed: list[float], z_tightened: list[float]) -> list[int]:
    out = []
    for a, b, c in zip(z, z_relaxed, z_tightened):
        if b > a > c:
            out.append(1)
        elif b < a < c:
            out.append(-1)
        else:
            out.append(0)
    return out


def loss(
    policy: Tensor, reference: Tensor, relaxed: Tensor, tightened: Tensor, beta: float, epsilon: float,
    cdpo_smoothing: float = 0.0,
) -> tuple[Tensor, list[int]]:
    """Mean ε-DPO loss from per-sequence log-probs [2B] (chosen first), pair by pair."""
    b = policy.shape[0] // 2
    z = (policy[:b] - policy[b:]).tolist()
    zr = (relaxed[:b] - relaxed[b:]).tolist()
    zt = (tightened[:b] - tightened[b:]).tolist()
    s = steps(z, zr, zt)
    total = policy.new_zeros(())
    for i in range(b):
        beta_i = beta / (1 + epsilon * s[i])
        u = (policy[i] - reference[i]) - (policy[b + i] - reference[b + i])
        total = total - (1 - cdpo_smoothing) * torch.nn.functional.logsigmoid(beta_i * u)
        total = total - cdpo_smoothing * torch.nn.functional.logsigmoid(-beta_i * u)
    return total / b, s


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))
