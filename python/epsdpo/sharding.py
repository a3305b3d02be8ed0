"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the ranks, for models
that do not fit one device. `TrainConfig(fsdp=True)` under `torchrun` turns it on.

No rank ever holds a whole model on its device: the trainer loads each model on the host, keeps what
it loaded aside and empties the model onto the meta device (`empty_onto_meta`); `shard` then splits
the empty model, gives each rank's device room for its own shards only, and copies each rank's part of
rank 0's host weights in (torch's `set_model_state_dict`, one tensor at a time). Moving the model to the
GPU first, then sharding, would hold the full policy and the full reference on every GPU at once.

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


def empty_onto_meta(model: nn.Module) -> dict[str, torch.Tensor]:
    """Empty `model`'s parameters onto the meta device; return its state dict as loaded (host tensors
    by name), for `shard` to copy each rank's part of. The parameter objects stay (swapped in place),
    so tied weights stay tied; buffers, small, stay where they are."""
    weights = model.state_dict()
    with torch.no_grad():
        for parameter in model.parameters():  # each shared parameter once
            empty = nn.Parameter(torch.empty_like(parameter, device="meta"), requires_grad=parameter.requires_grad)
            torch.utils.swap_tensors(parameter, empty)
    return weights


def shard(model: nn.Module, weights: dict[str, torch.Tensor], *, trainable: bool, device: torch.device,
          mixed_precision: Any = None) -> Scorer:
    """Shard `model` (emptied by `empty_onto_meta`) over the default process group onto `device`, load
    `weights` into its shards, and return its `Scorer` root unit.

    `trainable`: the policy. Its root keeps its parameters gathered between forward and backward
    (they are needed again at once); a frozen reference reshards everything after each forward.
    `mixed_precision`: an FSDP `MixedPrecisionPolicy` (epsdpo.precision.fsdp_mixed_precision) or None.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision or MixedPrecisionPolicy()
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    root = Scorer(model)
    fully_shard(root, mesh=mesh, reshard_after_forward=not trainable, mp_policy=policy)
    # fully_shard moved the buffers to the device; to_empty, which allocates this rank's shards,
    # would leave them uninitialised (the non-persistent ones, RoPE's frequencies, are in no state dict)
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    root.to_empty(device=device)
    # Rank 0's weights, one tensor at a time: each rank receives the tensor and copies its slice into
    # the shard allocated above (without broadcast_from_rank0 torch builds a second set of shards first)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, dict(weights), options=options)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    return root


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """`clip_grad_norm_` returns a DTensor for sharded gradients; its full value as a plain tensor."""
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer unsharded, on CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
