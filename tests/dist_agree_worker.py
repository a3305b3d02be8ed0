"""One rank of tests/test_rank_agreement.py:
`torchrun --standalone --nproc_per_node 2 dist_agree_worker.py OUT SCENARIO`.

SCENARIO:
- `differ:FIELD=VALUE,...` rank 1 alone is given these settings (a stale YAML on one node);
  `differ:data` gives rank 1 other training pairs;
- `local` each rank has its own output_dir, OUT/node<rank> (node-local disks), and resumes the
  newest checkpoint there (`resume_from_checkpoint=True`);
- `crash` both ranks die (os._exit) at the start of step 5, after checkpoint-4 is written, as
  when a node fails; `restart` the same command as torchrun re-runs it after such a failure, with
  TORCHELASTIC_RESTART_COUNT=1 (set here: torchrun itself sets it to the attempt's count, and its
  own restarts over gloo are too unreliable in torch 2.x to test through, see the test); `whole`
  the same run left alone.

Each rank writes `OUT/rank<N>.json`: how its Trainer() or train() ended, and its final step."""

import json
import os
import sys
from pathlib import Path

from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from tiny import tiny_llama, toy_store

out, scenario = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ["RANK"])
settings = dict(
    output_dir=str(out), beta=0.1, epsilon=0.1, learning_rate=3e-3, per_device_train_batch_size=2, max_steps=6,
    warmup_ratio=0.0, lr_scheduler_type="constant", max_length=32, max_prompt_length=16, progress=False,
    plots=False, seed=3, save_steps=2, logging_steps=1,
)
data_seed = 0
resume = None
if scenario.startswith("differ:") and rank == 1:
    for item in scenario.removeprefix("differ:").split(","):
        if item == "data":
            data_seed = 1
        else:
            name, value = item.split("=")
            settings[name] = json.loads(value)
if scenario == "local":
    settings["output_dir"] = str(out / f"node{rank}")
    resume = True
if scenario == "restart":
    os.environ["TORCHELASTIC_RESTART_COUNT"] = "1"

result = {"rank": rank}
try:
    trainer = Trainer(tiny_llama(0), TrainConfig(**settings), toy_store(seed=data_seed))
    if scenario == "crash":
        real_train_step = Trainer._train_step

        def train_step(self, batches):
            if self.state.global_step + 1 == 5:
                os._exit(1)
            return real_train_step(self, batches)

        Trainer._train_step = train_step
    trainer.train(resume_from_checkpoint=resume)
    result.update(ended="finished", step=trainer.state.global_step)
except Exception as error:  # noqa: BLE001 - the test reads how each rank ended
    result.update(ended=type(error).__name__, message=str(error))
(out / f"rank{rank}.json").write_text(json.dumps(result))
