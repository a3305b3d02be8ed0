"""One rank of tests/test_fsdp_memory.py: `torchrun --standalone --nproc_per_node 2 dist_fsdp_memory_worker.py OUT`.

Builds a Trainer with fsdp=True around a policy and a reference it holds itself, and writes to
OUT/memory{rank}.json the bytes the two models' parameters hold materialised (in storage that is not
the meta device) at three moments: when the trainer first hands a model to FSDP (`shard`), the most
at any torch operation from then until the trainer is built, and at the end. The test's docstring
says why these numbers measure what a GPU would hold.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
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


def materialised_bytes(models) -> int:
    """Bytes of the distinct storages behind the models' parameters (a sharded parameter: its local
    shard), the meta device's excepted: what those parameters occupy on the device."""
    storages = {}
    for model in models:
        for parameter in model.parameters():
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            if local.device.type != "meta":
                storage = local.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def unit_bytes(model) -> list[int]:
    """The bytes of each FSDP unit of `model`: every transformer block, and the root (the rest)."""
    blocks = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    sizes = [materialised_bytes([block]) for block in blocks]
    return [*sizes, materialised_bytes([model]) - sum(sizes)]


class PeakAfterEveryOperation(TorchDispatchMode):
    """Samples `materialised_bytes` after every torch operation while active; keeps the largest."""

    def __init__(self, models) -> None:
        super().__init__()
        self.models, self.peak = models, materialised_bytes(models)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, materialised_bytes(self.models))
        return result


out = Path(sys.argv[1])
policy, reference = six_layer_llama(), six_layer_llama()
models = [policy, reference]
record = {"total": materialised_bytes(models), "largest_unit": max(unit_bytes(policy))}
watch: list[PeakAfterEveryOperation] = []
real_shard = epsdpo.trainer.shard


def watched_shard(model, *args, **kwargs):
    if not watch:  # the first model handed to FSDP: whatever the models hold now is on the device already
        record["at_first_shard"] = materialised_bytes(models)
        watch.append(PeakAfterEveryOperation(models).__enter__())
    return real_shard(model, *args, **kwargs)


epsdpo.trainer.shard = watched_shard
config = TrainConfig(output_dir=str(out), fsdp=True, max_steps=1, per_device_train_batch_size=1, max_length=32,
                     max_prompt_length=16, progress=False, plots=False, seed=3)
trainer = Trainer(policy, config, toy_store(8), ref_model=reference)
watch[0].__exit__(None, None, None)
record.update(peak=watch[0].peak, final=materialised_bytes(models), rank=dist.get_rank(),
              world_size=dist.get_world_size(), sharded=trainer.sharded)
(out / f"memory{dist.get_rank()}.json").write_text(json.dumps(record))
