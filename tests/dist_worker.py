"""One rank of the multi-process tests:
`torchrun --standalone --nproc_per_node N dist_worker.py OUT BATCH [ddp|fsdp] [fresh|resume] [METHOD] [dropout]`.

`dropout`: the policy trains with attention dropout 0.5 (disable_dropout=False), so that every rank
draws its own random masks."""

import json
import sys
from pathlib import Path

from epsdpo.config import TrainConfig
from epsdpo.trainer import Trainer
from tiny import tiny_llama, toy_store

out, batch_size = Path(sys.argv[1]), int(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else "ddp"
resume = len(sys.argv) > 4 and sys.argv[4] == "resume"
method = sys.argv[5] if len(sys.argv) > 5 else "epsilon_dpo"
dropout = len(sys.argv) > 6 and sys.argv[6] == "dropout"
config = TrainConfig(
    output_dir=str(out), beta=0.1, epsilon=0.1, learning_rate=3e-3, per_device_train_batch_size=batch_size,
    max_steps=3, warmup_ratio=0.0, lr_scheduler_type="constant", max_length=32, max_prompt_length=16,
    progress=False, plots=False, seed=3, fsdp=mode == "fsdp", save_steps=2, method=method, ref_model_sync_steps=2,
    eval_steps=3, per_device_eval_batch_size=1, logging_steps=1, disable_dropout=not dropout,
)
# 5 eval pairs over 2 ranks: one rank scores a batch more than the other
policy = tiny_llama(0, attention_dropout=0.5 if dropout else 0.0)
trainer = Trainer(policy, config, toy_store(), eval_dataset=toy_store(5, seed=9))
trainer.train(resume_from_checkpoint=out / "checkpoint-2" if resume else None)
if trainer.dist.is_main:
    (out / "result.json").write_text(json.dumps({
        "history": trainer.state.log_history,
        "beta_history": trainer.kl.beta_history().tolist(),
        "world_size": trainer.dist.world_size,
        "sharded": trainer.sharded,
    }))
