"""The ε-DPO objective (docs/algorithm.md, 'The objective'), given per-sequence log-probs.

For each pair i (chosen y_w, rejected y_l) the step decides which way the KL penalty should move:

    z = log π(y_w) − log π(y_l)                    for the policy, relaxed and tightened policies
    s_i = +1 if z_relaxed > z > z_tightened        (loosening the KL raises the margin)
          −1 if z_relaxed < z < z_tightened        (tightening it raises the margin)
           0 otherwise
    β_i = β / (1 + ε·s_i)

and the loss is sigmoid DPO at β_i with conservative DPO smoothing ls (`cdpo_smoothing`):

    u_i    = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) − log π_ref(y_l)]
    loss_i = −(1 − ls)·log σ(β_i·u_i) − ls·log σ(−β_i·u_i)

(the official code writes log σ(+β_i·u_i) in both terms, which makes ls a no-op).

Worked example, one pair, β = 0.1, ε = 0.25, ls = 0.1:

    policy  log π(y_w) = −10, log π(y_l) = −12  →  z = 2
    relaxed z = 2.3, tightened z = 1.8         →  2.3 > 2 > 1.8, so s = +1
    β_i = 0.1 / (1 + 0.25·1) = 0.08
    ref     log π(y_w) = −11, log π(y_l) = −11  →  u = (−10 + 11) − (−12 + 11) = 2
    β_i·u = 0.16
    ls = 0:   loss = −log σ(0.16) = log(1 + e^−0.16) = log 1.852144 = 0.616344
    ls = 0.1: −log σ(−x) = −log σ(x) + x, so loss = 0.616344 + 0.1·0.16 = 0.632344
    rewards:  chosen 0.08·(−10 + 11) = 0.08, rejected 0.08·(−12 + 11) = −0.08
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pair_log_ratio(sequence_logps: Tensor) -> Tensor:
    """z [B] from per-sequence log-probs [2B] laid out chosen first, then rejected."""
    chosen, rejected = sequence_logps.chunk(2)
    return chosen - rejected


def kl_steps(z: Tensor, z_relaxed: Tensor, z_tightened: Tensor) -> Tensor:
    """Steps s_i ∈ {+1, 0, −1} (int64) by the strict rule; ties count as 0."""
    up = (z_relaxed > z) & (z > z_tightened)
    down = (z_relaxed < z) & (z < z_tightened)
    return up.long() - down.long()


def pair_betas(beta: float, epsilon: float, steps: Tensor) -> Tensor:
    """β_i = β / (1 + ε·s_i), as float64 so the base β's own precision is kept."""
    return beta / (1.0 + epsilon * steps.to(torch.float64))


def epsilon_dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    betas: Tensor,
    cdpo_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Unreduced (losses, chosen_rewards, rejected_rewards), each [B], with per-pair `betas` [B].
    `cdpo_smoothing` e: conservative DPO's assumed flip probability, the loss
    −(1 − e)·log σ(m) − e·log σ(−m) of each margin m (0: the plain sigmoid loss).

    Rewards are detached: they are metrics, not part of the objective."""
    if not 0.0 <= cdpo_smoothing < 0.5:
        raise ValueError(f"cdpo_smoothing={cdpo_smoothing!r} is invalid: must be in [0, 0.5)")
    betas = betas.to(policy_chosen.dtype)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    margin = betas * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - cdpo_smoothing) * F.logsigmoid(margin) - cdpo_smoothing * F.logsigmoid(-margin)
    return losses, betas * chosen_ratio.detach(), betas * rejected_ratio.detach()
