"""One rank of the callback test under torchrun: `torchrun ... dist_callback_worker.py OUT`.

Each flag is raised on one rank only: rank 1 asks for a checkpoint after step 1 and an evaluation
after step 2, rank 0 stops the run after step 3. Every rank writes what its callbacks saw."""

import json
import sys
from pathlib import Path

from transformers import TrainerCallback

from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from tiny import tiny_llama, toy_store

out = Path(sys.argv[1])


class OneRankFlags(TrainerCallback):
    def __init__(self, rank: int) -> None:
        self.rank, self.seen = rank, []

    def on_step_end(self, args, state, control, **kwargs):
        if self.rank == 1 and state.global_step == 1:
            control.should_save = True
        if self.rank == 1 and state.global_step == 2:
            control.should_evaluate = True
        if self.rank == 0 and state.global_step == 3:
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        self.seen.append(["save", state.global_step])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seen.append(["evaluate", state.global_step])


config = TrainConfig(
    output_dir=str(out), beta=0.1, epsilon=0.1, learning_rate=3e-3, per_device_train_batch_size=2, max_steps=10,
    lr_scheduler_type="constant", max_length=32, max_prompt_length=16, progress=False, plots=False, seed=3,
    logging_steps=1, eval_strategy="no",
)
trainer = Trainer(tiny_llama(0), config, toy_store(), eval_dataset=toy_store(5, seed=9))
flags = OneRankFlags(trainer.dist.rank)
trainer.add_callback(flags)
trainer.train()
(out / f"rank{trainer.dist.rank}.json").write_text(json.dumps({"seen": flags.seen, "step": trainer.state.global_step}))
