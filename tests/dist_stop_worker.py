"""One rank of tests/test_distributed.py's stop tests:
`torchrun --standalone --nproc_per_node 2 dist_stop_worker.py OUT SIGNAL_RANK`.

Trains the tiny model for 6 steps; when SIGNAL_RANK is not -1, that rank alone sends itself SIGTERM
at the start of step 2 (as a cluster whose signal reaches one process first). Each rank writes
`OUT/rank<N>.json`: how its train() ended and at which step."""

import os
import signal
import sys
from pathlib import Path

from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from tiny import tiny_llama, toy_store
from torchrun_job import record_how_training_ends

out, signal_rank = Path(sys.argv[1]), int(sys.argv[2])
config = TrainConfig(
    output_dir=str(out), beta=0.1, epsilon=0.1, learning_rate=3e-3, per_device_train_batch_size=4, max_steps=6,
    warmup_ratio=0.0, lr_scheduler_type="constant", max_length=32, max_prompt_length=16, progress=False, plots=False,
    seed=3, logging_steps=1, overwrite_output_dir=True,
)
trainer = Trainer(tiny_llama(0), config, toy_store())
real_train_step = Trainer._train_step


def train_step(self, batches):
    if self.dist.rank == signal_rank and self.state.global_step + 1 == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_train_step(self, batches)


Trainer._train_step = train_step
record_how_training_ends(trainer, out / f"rank{trainer.dist.rank}.json")
