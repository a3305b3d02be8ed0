"""One rank of tests/test_distributed.py's β-ledger test:
`torchrun --standalone --nproc_per_node 2 dist_ledger_worker.py OUT fresh|resume`.

Trains the tiny model on 8 pairs, 2 per rank per step, for 4 steps (two epochs, so a pair may be
trained by one rank in the first epoch and by the other in the second), saving after step 2;
`resume` continues from OUT/checkpoint-2. Each rank writes `OUT/trained<N>_<mode>.json`: the pair
ids of every step it trained, as the trainer was given them (independent of the ledger)."""

import json
import sys
from pathlib import Path

from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from tiny import tiny_llama, toy_store

out, mode = Path(sys.argv[1]), sys.argv[2]
config = TrainConfig(
    output_dir=str(out), beta=0.1, epsilon=0.1, learning_rate=3e-3, per_device_train_batch_size=2, max_steps=4,
    warmup_ratio=0.0, lr_scheduler_type="constant", max_length=32, max_prompt_length=16, progress=False, plots=False,
    seed=3, logging_steps=1, save_steps=2,
)
trainer = Trainer(tiny_llama(0), config, toy_store(8))
trained: list[list[int]] = []
real_train_step = Trainer._train_step


def train_step(self, batches):
    trained.append([int(i) for batch in batches for i in batch["pair_ids"]])
    return real_train_step(self, batches)


Trainer._train_step = train_step
trainer.train(resume_from_checkpoint=out / "checkpoint-2" if mode == "resume" else None)
(out / f"trained{trainer.dist.rank}_{mode}.json").write_text(json.dumps(trained))
