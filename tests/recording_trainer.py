"""A stand-in for `epsdpo.trainer.Trainer` that records how the CLI built it and trains nothing; the
`trainer` fixture (conftest.py) puts it in place."""

from __future__ import annotations

from types import SimpleNamespace


class RecordingTrainer:
    calls: list[dict] = []

    def __init__(self, model, config, train_dataset, tokenizer=None, ref_model=None, eval_dataset=None):
        RecordingTrainer.calls.append(dict(model=model, config=config, train_dataset=train_dataset,
                                           tokenizer=tokenizer, ref_model=ref_model, eval_dataset=eval_dataset))
        self.dist = SimpleNamespace(is_main=True)
        self.state = SimpleNamespace(global_step=0)
        self.kl = SimpleNamespace(beta=config.beta)

    def train(self, resume_from_checkpoint=None):
        RecordingTrainer.calls[-1]["resume"] = resume_from_checkpoint
