"""One rank of tests/test_fsdp_memory.py: `torchrun --standalone --nproc_per_node 2 dist_fsdp_memory_worker.py OUT`.

Builds a Trainer with fsdp=True around a policy and a reference it holds itself, and writes to
OUT/memory{rank}.json the bytes the two models' parameters hold materialised (in storage that is not
the meta device) when the trainer first hands a model to FSDP (`shard`) and when the trainer is
built, and the most they and every tensor made since that first `shard` held at once, sampled after
every torch operation. The test's docstring
says why these numbers measure what a GPU would hold.
"""

import json
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import epsdpo.trainer
from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from tiny import VOCAB, toy_store


def six_layer_llama():
    """Six blocks, so that one FSDP unit is small next to the whole model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa"))


def parameter_storages(models) -> dict[int, int]:
    """Bytes by storage address of the distinct storages behind the models' parameters (a sharded
    parameter: its local shard), the meta device's excepted."""
    storages = {}
    for model in models:
        for parameter in model.parameters():
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            if local.device.type != "meta":
                storage = local.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return storages


def materialised_bytes(models) -> int:
    """What the models' parameters occupy off the meta device."""
    return sum(parameter_storages(models).values())


def unit_bytes(model) -> list[int]:
    """The bytes of each FSDP unit of `model`: every transformer block, and the root (the rest)."""
    blocks = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    sizes = [materialised_bytes([block]) for block in blocks]
    return [*sizes, materialised_bytes([model]) - sum(sizes)]


class PeakAfterEveryOperation(TorchDispatchMode):
    """While active, after every torch operation: the bytes of the models' parameter storages plus
    those of every tensor an operation made since then that is still alive (copies in transit,
    tensors received from other ranks, shards built on the side), each storage counted once; keeps
    the largest. Everything made from the first `shard` on is device memory on a GPU."""

    def __init__(self, models, host: dict[int, weakref.ref]) -> None:
        super().__init__()
        self.models, self.host, self.made = models, host, []
        self.peak = materialised_bytes(models)

    def on_host(self, storage) -> bool:
        """Whether `storage` holds weights as loaded: host memory on a GPU machine. On CPU, moving one of
        them to the device (`.to("cpu")`) returns the tensor itself, whose storage must not count."""
        known = self.host.get(id(storage))
        return known is not None and known() is storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(result):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                try:  # a weak reference to the storage: one to the tensor would stop FSDP swapping it
                    storage = tensor.untyped_storage()
                except RuntimeError:  # a wrapper (DTensor) with no storage of its own
                    continue
                if not self.on_host(storage):
                    self.made.append(weakref.ref(storage))
        self.made = [made for made in self.made if made() is not None]
        storages = parameter_storages(self.models)
        for made in self.made:
            storage = made()
            try:
                storages[storage.data_ptr()] = storage.nbytes()
            except (AttributeError, RuntimeError):  # gone meanwhile, or swapped into a parameter (counted there)
                pass
        self.peak = max(self.peak, sum(storages.values()))
        return result


out = Path(sys.argv[1])
policy, reference = six_layer_llama(), six_layer_llama()
models = [policy, reference]
record = {"total": materialised_bytes(models), "largest_unit": max(unit_bytes(policy))}
# the weights as built, which the trainer keeps on the host until they are sharded
host = {id(storage): weakref.ref(storage)
        for storage in (p.untyped_storage() for model in models for p in model.parameters())}
watch: list[PeakAfterEveryOperation] = []
real_shard = epsdpo.trainer.shard


def watched_shard(model, *args, **kwargs):
    if not watch:  # the first model handed to FSDP: whatever the models hold now is on the device already
        record["at_first_shard"] = materialised_bytes(models)
        watch.append(PeakAfterEveryOperation(models, host).__enter__())
    return real_shard(model, *args, **kwargs)


epsdpo.trainer.shard = watched_shard
config = TrainConfig(output_dir=str(out), fsdp=True, max_steps=1, per_device_train_batch_size=1, max_length=32,
                     max_prompt_length=16, progress=False, plots=False, seed=3)
trainer = Trainer(policy, config, toy_store(8), ref_model=reference)
watch[0].__exit__(None, None, None)
record.update(peak=watch[0].peak, final=materialised_bytes(models), rank=dist.get_rank(),
              world_size=dist.get_world_size(), sharded=trainer.sharded)
(out / f"memory{dist.get_rank()}.json").write_text(json.dumps(record))
