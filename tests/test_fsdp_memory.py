"""FSDP never holds a whole model on a rank's device: each rank materialises its shards, not the
policy and the reference whole before sharding them."""

from __future__ import annotations

import json

import pytest
from torchrun_job import run_torchrun


@pytest.mark.slow
def test_no_rank_materialises_the_whole_models_only_its_shards(tmp_path):
    """Two gloo ranks build an fsdp=True trainer around a 6-block policy and a reference
    (tests/dist_fsdp_memory_worker.py). On a CPU run the host and the "device" are the same memory,
    so the process's peak memory cannot tell a host copy from a device copy. What is measured instead
    is what a GPU would have to hold: the storages behind the policy's and the reference's
    parameters (a sharded parameter: its local shard) that are not on the meta device, plus every
    tensor a torch operation made from the moment the trainer first hands a model to FSDP (`shard`)
    that is still alive (copies in transit, tensors received from rank 0, shards built on the side),
    each storage counted once and sampled after every operation (a TorchDispatchMode). The weights as
    loaded are host memory and are left out: on CPU, moving one to the device returns the tensor
    itself, so rank 0's one-tensor-at-a-time copy is seen on rank 1 only, as its receive buffer.

    Moving the models to the device before sharding (what the trainer did) holds both whole models
    when FSDP first gets one. Sharding from the meta device holds nothing then, and each rank ends
    with half of every parameter; on the way it may hold one FSDP unit more (the largest: a block or
    the root), never the whole set. Loading with set_model_state_dict without broadcast_from_rank0
    builds a second set of shards first, which the peak also catches."""
    done = run_torchrun("dist_fsdp_memory_worker.py", tmp_path, nproc=2, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"memory{rank}.json").read_text()) for rank in (0, 1)]
    total = ranks[0]["total"]  # the policy's and the reference's parameters, whole
    assert all(r["sharded"] and r["world_size"] == 2 and r["total"] == total for r in ranks)
    for r in ranks:
        share = total / 2 + r["largest_unit"]
        assert r["largest_unit"] < total / 4  # one unit is small enough for the bound to mean something
        held = r["at_first_shard"]
        assert held <= share, f"rank {r['rank']} held {held} of {total} bytes before sharding"
        assert r["peak"] <= share, f"rank {r['rank']} peaked at {r['peak']} of {total} bytes"
        assert r["final"] <= total / 2 + 1024, r  # its half, give or take FSDP's padding of odd-sized rows
    # between them the ranks hold every parameter once: nothing lost, nothing duplicated
    assert sum(r["final"] for r in ranks) >= total
