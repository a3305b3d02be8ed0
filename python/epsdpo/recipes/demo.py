"""`epsdpo demo`: ε-DPO on SmolLM2-135M-Instruct with the bundled instruction-following pairs.

It scores greedy answers to held-out prompts with the demo's programmatic checker, trains for a few
minutes on CPU, scores again, and writes metrics, plots and the model under the output directory.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from epsdpo.config import TrainConfig
from epsdpo.evaluation import generate_answers, score_answers, win_rate
from epsdpo.models import load_causal_lm, load_tokenizer, smollm2_gguf_path
from epsdpo.recipes.demo_options import FIXED_SETTINGS, DemoOptions

__all__ = ["DemoOptions", "run_demo"]


def run_demo(options: DemoOptions) -> dict[str, Any]:
    from epsdpo.data import demo_dataset, demo_scorer
    from epsdpo.data.demo import demo_rows
    from epsdpo.trainer import Trainer

    if options.threads:
        torch.set_num_threads(options.threads)
    out = Path(options.output_dir)
    started = time.perf_counter()
    gguf = smollm2_gguf_path()
    print(f"model: SmolLM2-135M-Instruct ({gguf.name})")
    tokenizer = load_tokenizer(gguf)
    policy = load_causal_lm(gguf)
    test = demo_rows("test")[: options.eval_prompts]
    prompts = [row["prompt"] for row in test]
    specs = [row["instructions"] for row in test]

    print(f"scoring {len(prompts)} held-out prompts before training ...")
    before_answers = generate_answers(policy, tokenizer, prompts, max_new_tokens=options.max_new_tokens)
    before = score_answers(before_answers, specs, demo_scorer.score)

    config = TrainConfig(
        output_dir=str(out), beta=options.beta, epsilon=options.epsilon, learning_rate=options.learning_rate,
        per_device_train_batch_size=options.batch_size, max_steps=options.max_steps, layout=options.layout,
        save_steps=None, logging_steps=1, bf16=options.bf16, overwrite_output_dir=True, **FIXED_SETTINGS,
    )
    trainer = Trainer(policy, config, demo_dataset("train"), tokenizer=tokenizer)
    trainer.train()

    print(f"scoring {len(prompts)} held-out prompts after training ...")
    after_answers = generate_answers(trainer.model, tokenizer, prompts, max_new_tokens=options.max_new_tokens)
    after = score_answers(after_answers, specs, demo_scorer.score)
    summary = {
        "steps": trainer.state.global_step,
        "beta_start": float(trainer.kl.beta_history()[0]),
        "beta_end": trainer.kl.beta,
        "final_loss": [r for r in trainer.state.log_history if "loss" in r][-1]["loss"],
        "gold_score_before": statistics.mean(before),
        "gold_score_after": statistics.mean(after),
        "win_rate_after_vs_before": win_rate(after, before),
        "eval_prompts": len(prompts),
        "learning_rate": options.learning_rate,
        "precision": "bf16 autocast, fp32 master weights" if options.bf16 else "fp32",
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    with (out / "demo_answers.jsonl").open("w") as f:
        for row, answer_before, answer_after, score_before, score_after in zip(test, before_answers, after_answers, before, after):
            f.write(json.dumps({"instructions": row["instructions"], "before": answer_before, "after": answer_after,
                                "score_before": score_before, "score_after": score_after}) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"model:   {out / 'final'}\nmetrics: {out / 'metrics.jsonl'}\nplots:   {out / 'plots'}\n"
          f"answers: {out / 'demo_answers.jsonl'}\nβ ledger: {out / 'beta_ledger.npz'}")
    return summary
