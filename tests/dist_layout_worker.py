"""One rank of tests/test_distributed.py's storage-layout tests:
`torchrun --standalone --nproc_per_node 2 dist_layout_worker.py BASE [probe|no-probe]`.

Simulates node-local disks: each rank works in its own folder `BASE/node<RANK>` with the same relative
`output_dir: run`, so the configs are equal and the storage differs, as on two nodes that each mount
their own disk at the same path. Trains with FSDP and a checkpoint at step 2. `no-probe` skips the
start-up check that output_dir is shared, to reach the check made when a checkpoint is finished (as
when storage stops being shared during the run). Each rank writes `BASE/rank<N>.json`: how its
train() ended and at which step."""

import os
import sys
from pathlib import Path

import epsdpo.trainer
from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from tiny import tiny_llama, toy_store
from torchrun_job import record_how_training_ends

base, probe = Path(sys.argv[1]).resolve(), sys.argv[2] == "probe"
rank = int(os.environ["RANK"])
node = base / f"node{rank}"
node.mkdir(parents=True, exist_ok=True)
os.chdir(node)
if not probe:
    epsdpo.trainer.require_shared_output_dir = lambda output_dir, dist: None
config = TrainConfig(
    output_dir="run", beta=0.1, epsilon=0.1, learning_rate=3e-3, per_device_train_batch_size=2, max_steps=3,
    warmup_ratio=0.0, lr_scheduler_type="constant", max_length=32, max_prompt_length=16, progress=False,
    plots=False, seed=3, fsdp=True, save_steps=2, logging_steps=1,
)
trainer = Trainer(tiny_llama(0), config, toy_store())
record_how_training_ends(trainer, base / f"rank{rank}.json")
