"""One rank of tests/test_distributed.py's frozen-peer test:
`torchrun --standalone --nproc_per_node 2 dist_freeze_worker.py OUT DDP_TIMEOUT`.

Trains the tiny model for 6 steps with `ddp_timeout=DDP_TIMEOUT`; at the start of step 2 rank 1
writes `OUT/frozen.json` (its pid and the time) and stops itself with SIGSTOP, as a rank whose GPU
hangs or whose read stalls: alive, but answering no collective. Rank 0 writes `OUT/rank0.json`
(how its train() ended, and when) and exits with the error. Each rank writes its pid to `OUT/pid<N>`
first, so that the test can end both whatever happens."""

import json
import os
import signal
import sys
import time
from pathlib import Path

from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from tiny import tiny_llama, toy_store

out, ddp_timeout = Path(sys.argv[1]), int(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
(out / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))  # for the test's cleanup, whatever happens
config = TrainConfig(
    output_dir=str(out), beta=0.1, epsilon=0.1, learning_rate=3e-3, per_device_train_batch_size=4, max_steps=6,
    warmup_ratio=0.0, lr_scheduler_type="constant", max_length=32, max_prompt_length=16, progress=False, plots=False,
    seed=3, logging_steps=1, overwrite_output_dir=True, ddp_timeout=ddp_timeout,
)
trainer = Trainer(tiny_llama(0), config, toy_store())
real_train_step = Trainer._train_step


def train_step(self, batches):
    if self.dist.rank == 1 and self.state.global_step + 1 == 2:
        (out / "frozen.json").write_text(json.dumps({"pid": os.getpid(), "time": time.time()}))
        os.kill(os.getpid(), signal.SIGSTOP)
    return real_train_step(self, batches)


Trainer._train_step = train_step
ended = {"ended": "interrupted"}
try:
    trainer.train()
    ended = {"ended": "finished"}
except Exception as error:
    ended = {"ended": type(error).__name__, "message": str(error)[:2000]}
    raise
finally:
    if trainer.dist.rank == 0:
        (out / "rank0.json").write_text(json.dumps({**ended, "time": time.time(), "step": trainer.state.global_step}))
