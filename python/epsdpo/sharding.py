"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the ranks, for models
that do not fit one device. `TrainConfig(fsdp=True)` under `torchrun` turns it on.

Each transformer block is its own FSDP unit (gathered for its forward and backward, resharded after);
the root unit is the `Scorer` around the model, which holds the embeddings, the final norm and the
head, so the fused kernel reads a gathered head weight inside the root's forward. FSDP averages
gradients over ranks (a custom sum needs PREMUL_SUM, which gloo lacks), so the trainer divides the
loss by the global number of pairs over the world size, giving the same gradients as the sum.

Checkpoints are sharded: every rank writes its own shards with torch.distributed.checkpoint
(epsdpo.checkpoint), so no rank holds the whole model. Only `final/` gathers the full weights, to rank
0's CPU, so that it is one ordinary Hugging Face folder.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from epsdpo.scoring import Scorer


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: modules of the classes the model names as not to be split."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"fsdp: cannot find the transformer blocks of {type(model).__name__} (it lists no `_no_split_modules`)"
        )
    return blocks


def shard(model: nn.Module, *, trainable: bool, mixed_precision: Any = None) -> Scorer:
    """Shard `model` in place over the default process group; return its `Scorer` root unit.

    `trainable`: the policy. Its root keeps its parameters gathered between forward and backward
    (they are needed again at once); a frozen reference reshards everything after each forward.
    `mixed_precision`: an FSDP `MixedPrecisionPolicy` (epsdpo.precision.fsdp_mixed_precision) or None.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = mixed_precision or MixedPrecisionPolicy()
    for block in _blocks(model):
        fully_shard(block, mp_policy=policy)
    root = Scorer(model)
    fully_shard(root, reshard_after_forward=not trainable, mp_policy=policy)
    return root


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """`clip_grad_norm_` returns a DTensor for sharded gradients; its full value as a plain tensor."""
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer unsharded, on CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
