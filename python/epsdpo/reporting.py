"""Where logged metrics go: the in-memory history, `metrics.jsonl`, and optionally TensorBoard or
Weights & Biases; an evaluation's main metrics also go to the console (`eval_summary`). Only rank 0
writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, output_dir: Path, report_to: str, enabled: bool, config: dict[str, Any]) -> None:
        self.history: list[dict[str, Any]] = []
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "tensorboard"))
        elif report_to == "wandb":
            import wandb

            self._wandb = wandb.init(config=config, dir=str(output_dir), name=config.get("run_name"))

    def restore(self, history: list[dict[str, Any]]) -> None:
        """After a resume: keep the history and rewrite metrics.jsonl to match it exactly."""
        self.history = list(history)
        if self.enabled:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


EVAL_SUMMARY = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_kl/pair_beta_mean")


def eval_summary(step: int, metrics: dict[str, float]) -> str:
    """One console line with an evaluation's main metrics, e.g.
    `step 40 eval: loss 0.6712 | rewards/accuracies 0.625 | rewards/margins 0.0413 | kl/pair_beta_mean 0.0987`."""
    shown = [f"{key.removeprefix('eval_')} {metrics[key]:.4g}" for key in EVAL_SUMMARY if key in metrics]
    return f"step {step} eval: " + " | ".join(shown)
