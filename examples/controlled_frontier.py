"""Does the adaptive β help? A controlled experiment with a known gold reward, on 2 CPU cores.

In the tradition of DPO's controlled sentiment generation: the gold reward is a program, the model is
small enough to train to the end dozens of times, and the design states its metric, its test and its
power before it runs. Everything is generated from seeds by this script:

1. a synthetic corpus (prompts of 4 content tokens; 10-token completions that copy a prompt token
   30 % of the time and are uniform otherwise) trains a ~100k-parameter Llama by supervised learning:
   the SFT policy, and the reference of every run;
2. gold reward of a completion: how many of its tokens appear in the prompt, minus how many repeat
   the token before them (an integer in [−9, 10]);
3. per seed: 9,600 training prompts, two SFT samples each, labelled by Bradley–Terry sampling from
   their gold-reward difference at two label temperatures (two label-noise levels);
4. the grid: DPO, ε-DPO (ε = 0.01 and 0.05), TR-DPO and β-DPO over a β grid, plus the ε_s × ε_c
   ablation, every cell trained with `epsdpo.Trainer` for one epoch and evaluated with
   `epsdpo.evaluation` on 1,000 held-out prompts (2,000 samples);
5. the analysis written down below (ANALYSIS_PLAN) before any run: reward at matched KL, paired by
   seed, with 95 % intervals, Holm-adjusted tests and the smallest detectable effect.

    python examples/controlled_frontier.py            # the full design, ≤ 60 min on 2 CPU cores
    python examples/controlled_frontier.py --quick    # the same pipeline on a tiny grid, ≤ 3 min

Writes docs/controlled_frontier.md (tables, plots, machine, command, wall time) and
docs/controlled_frontier.json (every run's raw results). Finished cells are kept under --out and
skipped when the script is run again with the same design.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_page import write_page_keeping_reading  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------ design
PAD, BOS, FIRST_CONTENT = 0, 1, 2


@dataclass(frozen=True)
class Task:
    """The synthetic language and its gold reward."""

    content_tokens: int = 24
    prompt_tokens: int = 4
    completion_tokens: int = 10
    copy_probability: float = 0.3

    @property
    def vocab_size(self) -> int:
        return FIRST_CONTENT + self.content_tokens

    def prompts(self, rng: np.random.Generator, n: int) -> list[list[int]]:
        body = rng.integers(FIRST_CONTENT, self.vocab_size, (n, self.prompt_tokens))
        return [[BOS, *row] for row in body.tolist()]

    def sft_completions(self, rng: np.random.Generator, prompts: list[list[int]]) -> list[list[int]]:
        """The corpus: each token copies a random prompt token with `copy_probability`, else is uniform."""
        n, length = len(prompts), self.completion_tokens
        copies = rng.random((n, length)) < self.copy_probability
        picks = rng.integers(1, self.prompt_tokens + 1, (n, length))
        uniform = rng.integers(FIRST_CONTENT, self.vocab_size, (n, length))
        source = np.asarray(prompts)
        return np.where(copies, np.take_along_axis(source, picks, axis=1), uniform).tolist()

    def gold_reward(self, prompt: list[int], completion: list[int]) -> int:
        """Tokens found in the prompt, minus tokens repeating their predecessor: graded, prompt-dependent,
        and not maximised by the laziest policy (copying one prompt token over and over scores 1)."""
        tokens = completion[: self.completion_tokens]
        wanted = set(prompt[1:])
        return sum(t in wanted for t in tokens) - sum(a == b for a, b in zip(tokens, tokens[1:]))


@dataclass(frozen=True)
class Arm:
    """One training rule of the grid: a label and the TrainConfig fields that make it."""

    name: str
    method: str
    epsilon: float = 0.0
    epsilon_check: float | None = None


MAIN_ARMS = (
    Arm("DPO", "dpo"),
    Arm("ε-DPO ε=0.01", "epsilon_dpo", 0.01),
    Arm("ε-DPO ε=0.05", "epsilon_dpo", 0.05),
    Arm("TR-DPO", "tr_dpo"),
    Arm("β-DPO", "beta_dpo"),
)
# With the two ε-DPO arms above, a 2 × 2 factorial over the step size ε_s and the check size ε_c
ABLATION_ARMS = (
    Arm("ε_s=0.01, ε_c=0.05", "epsilon_dpo", 0.01, 0.05),
    Arm("ε_s=0.05, ε_c=0.01", "epsilon_dpo", 0.05, 0.01),
)
PRIMARY = "ε-DPO ε=0.01"
BASELINES = ("DPO", "TR-DPO")


@dataclass(frozen=True)
class Design:
    task: Task = field(default_factory=Task)
    seeds: int = 8
    betas: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8)
    # Bradley–Terry temperature of the labels, in gold-reward units: P(a ≻ b) = σ((r_a − r_b) / T)
    label_temperatures: tuple[float, ...] = (1.0, 3.0)
    ablation_temperature: float = 1.0
    arms: tuple[Arm, ...] = MAIN_ARMS
    ablation_arms: tuple[Arm, ...] = ABLATION_ARMS
    train_pairs: int = 9600
    eval_prompts: int = 1000
    samples_per_prompt: int = 4  # 2 left 5 of 320 runs with a KL se above 5 % of the KL range
    batch_size: int = 32
    learning_rate: float = 1e-3
    tr_dpo_updates: int = 8  # TR-DPO's reference moves this many times per run (α = 0.6)
    hidden_size: int = 64
    layers: int = 2
    sft_steps: int = 400
    sft_batch_size: int = 128
    sft_learning_rate: float = 3e-3
    workers: int = 2

    @property
    def steps(self) -> int:  # one epoch: every pair is seen once, none is memorised
        return self.train_pairs // self.batch_size


QUICK = Design(seeds=2, betas=(0.2, 0.8), label_temperatures=(1.0,), arms=MAIN_ARMS[:2], ablation_arms=(),
               train_pairs=320, eval_prompts=100, sft_steps=40)

ANALYSIS_PLAN = """\
Written before any run of the full design, and applied to it unchanged:

- **Primary metric:** mean gold reward of completions sampled (temperature 1) from the trained policy
  on the held-out prompts, at matched KL(π_θ‖π_ref). For one arm and one seed, the β grid traces a
  curve of (KL, reward) points; reward at a KL is read off it by linear interpolation in log KL.
- **Matched-KL difference Δ(A, B):** for one seed, the mean over 5 KL values, log-spaced across the
  range that every seed of both arms covers, of reward_A(KL) − reward_B(KL). Seeds share their
  preference data, data order and evaluation samples across arms, so Δ is paired by seed.
- **Primary comparisons:** ε-DPO (ε = 0.01, the paper's) against DPO and against TR-DPO, at each
  label-noise level: 4 two-sided paired t-tests on the seeds' Δ, Holm-adjusted at family α = 0.05.
  Everything else (ε = 0.05, β-DPO, the ablation, win rates, Fig. 4a) is secondary and descriptive.
- **Intervals:** 95 % t-intervals across seeds. **Power:** the smallest Δ a two-sided paired t-test at
  α = 0.05 detects with 80 % power, (t₀.₉₇₅ + t₀.₈)·sd(Δ)/√n, from the observed sd.
- **Validity checks, reported:** final KL depends on β (KL at the smallest β over KL at the largest
  ≥ 3); every run's KL standard error ≤ 5 % of the KL range; the label-noise rate at each level.
"""


# ------------------------------------------------------------------------------------------ data
def tiny_llama(design: Design, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=design.task.vocab_size, hidden_size=design.hidden_size, intermediate_size=3 * design.hidden_size,
        num_hidden_layers=design.layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
        bos_token_id=BOS, pad_token_id=PAD, eos_token_id=None, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def train_sft(design: Design, folder: Path) -> dict[str, Any]:
    """Supervised learning on the synthetic corpus (fresh samples every step, so the model learns the
    corpus's distribution rather than memorising it), saved with save_pretrained."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = tiny_llama(design)
    optimizer = torch.optim.AdamW(model.parameters(), lr=design.sft_learning_rate, weight_decay=0.0)
    warmup = max(1, design.sft_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / design.sft_steps)))
    task, prompt_length = design.task, 1 + design.task.prompt_tokens
    started, losses = time.perf_counter(), []
    for _ in range(design.sft_steps):
        prompts = task.prompts(rng, design.sft_batch_size)
        sequences = torch.tensor([p + c for p, c in zip(prompts, task.sft_completions(rng, prompts))])
        labels = sequences.clone()
        labels[:, :prompt_length] = -100  # the completion is what the policy learns to write
        loss = model(input_ids=sequences, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.save_pretrained(folder)
    return {"seconds": round(time.perf_counter() - started, 1), "final_loss": float(np.mean(losses[-20:])),
            "parameters": sum(p.numel() for p in model.parameters())}


def load_sft(folder: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # hundreds of loads would each draw one

    return LlamaForCausalLM.from_pretrained(folder).eval()


def sample(model: torch.nn.Module, design: Design, prompts: list[list[int]], seed: int) -> list[list[int]]:
    """One completion per prompt from the model at temperature 1 (epsdpo.evaluation)."""
    from epsdpo.evaluation import sample_completions_from_ids

    pairs = sample_completions_from_ids(model, prompts, pad_token_id=PAD, max_new_tokens=design.task.completion_tokens,
                                        batch_size=1000, seed=seed)
    return [answer for _, answer in pairs]


def held_out_prompts(design: Design) -> list[list[int]]:
    """Each prompt repeated samples_per_prompt times: more samples tighten the KL estimate."""
    prompts = design.task.prompts(np.random.default_rng(10_000), design.eval_prompts)
    return [p for p in prompts for _ in range(design.samples_per_prompt)]


def build_datasets(design: Design, sft: torch.nn.Module, seed: int, out: Path) -> list[dict[str, Any]]:
    """This seed's training pairs, labelled at each label temperature; the stores are saved for the
    workers and the label statistics returned."""
    import epsdpo

    task = design.task
    rng = np.random.default_rng(seed)
    held_out = {tuple(p) for p in held_out_prompts(design)}
    prompts: list[list[int]] = []
    while len(prompts) < design.train_pairs:  # prompts and held-out prompts are disjoint
        prompts += [p for p in task.prompts(rng, design.train_pairs) if tuple(p) not in held_out]
    prompts = prompts[: design.train_pairs]
    first, second = sample(sft, design, prompts, 2 * seed + 1), sample(sft, design, prompts, 2 * seed + 2)
    gap = np.array([task.gold_reward(p, a) - task.gold_reward(p, b) for p, a, b in zip(prompts, first, second)])
    stats = []
    dataset_path(out, seed, 0.0).parent.mkdir(parents=True, exist_ok=True)
    for temperature in design.label_temperatures:
        draws = np.random.default_rng([seed, int(temperature * 1000)]).random(len(prompts))
        first_wins = draws < 1 / (1 + np.exp(-gap / temperature))
        store = epsdpo.PreferenceStore(vocab_size=task.vocab_size)
        for p, a, b, wins in zip(prompts, first, second, first_wins):
            store.add_pair(p, a, b) if wins else store.add_pair(p, b, a)
        store.save(dataset_path(out, seed, temperature))
        untied = gap != 0
        stats.append({"seed": seed, "label_temperature": temperature, "pairs": len(prompts),
                      "tie_rate": float(1 - untied.mean()),
                      # the two samples are the same tokens: epsdpo drops such a pair, as it has nothing to learn
                      "identical_rate": float(np.mean([a == b for a, b in zip(first, second)])),
                      "label_noise": float(((gap > 0) != first_wins)[untied].mean())})
    return stats


def dataset_path(out: Path, seed: int, temperature: float) -> Path:
    return out / "data" / f"seed{seed}_T{temperature:g}.store"


# ------------------------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class Cell:
    arm: Arm
    beta: float
    seed: int
    label_temperature: float

    @property
    def key(self) -> str:
        slug = f"{self.arm.method}_e{self.arm.epsilon:g}_c{self.arm.epsilon_check}"
        return f"{slug}_b{self.beta:g}_s{self.seed}_T{self.label_temperature:g}"


def cells(design: Design) -> list[Cell]:
    grid = [Cell(arm, beta, seed, t) for t in design.label_temperatures for seed in range(design.seeds)
            for arm in design.arms for beta in design.betas]
    grid += [Cell(arm, beta, seed, design.ablation_temperature) for seed in range(design.seeds)
             for arm in design.ablation_arms for beta in design.betas]
    return grid


_WORKER: dict[str, Any] = {}


def _init_worker(design: Design, out: Path) -> None:
    # One thread per worker and one worker per core: tiny models run op by op, not in parallel inside ops
    torch.set_num_threads(1)
    prompts = held_out_prompts(design)
    sft = load_sft(out / "sft")
    sft_rewards = json.loads((out / "sft_eval.json").read_text())["rewards"]
    _WORKER.update(design=design, out=out, prompts=prompts, sft=sft, sft_rewards=sft_rewards)


def run_cell(cell: Cell) -> dict[str, Any]:
    """Train one cell with epsdpo.Trainer and evaluate it on the held-out prompts."""
    import shutil

    import epsdpo
    from epsdpo.evaluation import sequence_kls, sequence_log_ratios, win_rate

    design, out, sft = _WORKER["design"], _WORKER["out"], _WORKER["sft"]
    started = time.perf_counter()
    store = epsdpo.PreferenceStore.load(dataset_path(out, cell.seed, cell.label_temperature))
    run_dir = out / "runs" / cell.key
    config = epsdpo.TrainConfig(
        output_dir=str(run_dir), method=cell.arm.method, beta=cell.beta, epsilon=cell.arm.epsilon,
        epsilon_check=cell.arm.epsilon_check, learning_rate=design.learning_rate,
        per_device_train_batch_size=design.batch_size, num_train_epochs=1, layout="padded",
        lr_scheduler_type="cosine", warmup_ratio=0.1, seed=cell.seed, logging_steps=10,
        ref_model_sync_steps=max(1, design.steps // design.tr_dpo_updates), ref_model_mixup_alpha=0.6,
        device="cpu", progress=False, plots=False, report_to="none", overwrite_output_dir=True,
    )
    # Fresh copies: TR-DPO moves its reference, and the worker's SFT model stays the KL's fixed anchor
    policy, reference = copy.deepcopy(sft).requires_grad_(True), copy.deepcopy(sft)
    trainer = epsdpo.Trainer(policy, config, store, ref_model=reference)
    trainer.train()
    trained = time.perf_counter()
    # The same evaluation samples' seed for every arm of a seed: arms differ only in their policy
    answers = sample(trainer.model, design, _WORKER["prompts"], seed=100_000 + cell.seed)
    rewards = [design.task.gold_reward(p, a) for p, a in zip(_WORKER["prompts"], answers)]
    samples = list(zip(_WORKER["prompts"], answers))
    kls = sequence_kls(trainer.model, sft, samples, batch_size=500)
    log_ratios = sequence_log_ratios(trainer.model, sft, samples, batch_size=500)  # the plain estimate, as a check
    n = len(rewards)
    history = [r for r in trainer.state.log_history if "loss" in r]
    result = {
        **asdict(cell), "arm": cell.arm.name, "steps": trainer.state.global_step,
        "reward": float(np.mean(rewards)), "reward_se": float(np.std(rewards, ddof=1) / math.sqrt(n)),
        "kl": float(np.mean(kls)), "kl_se": float(np.std(kls, ddof=1) / math.sqrt(n)),
        "kl_plain": float(np.mean(log_ratios)), "kl_plain_se": float(np.std(log_ratios, ddof=1) / math.sqrt(n)),
        "win_rate": win_rate(rewards, _WORKER["sft_rewards"]), "final_beta": trainer.kl.beta,
        "final_train_loss": history[-1]["loss"], "final_train_accuracy": history[-1]["rewards/accuracies"],
        "beta_history": [r["kl/beta"] for r in history][:: max(1, len(history) // 30)],
        "train_seconds": round(trained - started, 2), "eval_seconds": round(time.perf_counter() - trained, 2),
    }
    if (cell.arm.name, cell.beta, cell.label_temperature) == fig4a_cell(design):
        result["fig4a_bins"] = fig4a_bins(trainer, store, sft, cell.beta)
    shutil.rmtree(run_dir, ignore_errors=True)  # the weights are not needed for the report
    return result


def fig4a_bins(trainer: Any, store: Any, reference: torch.nn.Module, beta0: float, bins: int = 8) -> list[dict[str, float]]:
    """Per-pair β_i at its last visit (the KlController ledger) over β₀, and the pair's mean step s_i
    (+1: β lowered for it, −1: raised), averaged within octiles of its reference margin
    log π_ref(y_w|x) − log π_ref(y_l|x)."""
    from epsdpo.reference_logps import precompute_reference_logps

    table = precompute_reference_logps(reference, store, trainer.collator, 500, trainer.precision).double().numpy()
    margins = table[:, 0] - table[:, 1]
    ledger = trainer.kl.ledger()
    index_of = {int(store.pair_id(i)): i for i in range(len(store))}
    rows = np.array([index_of[int(pid)] for pid in ledger["pair_ids"]])
    margin, ratio = margins[rows], np.asarray(ledger["last_beta"]) / beta0
    visits = ledger["plus"] + ledger["zero"] + ledger["minus"]
    step = (ledger["plus"].astype(float) - ledger["minus"]) / np.maximum(visits, 1)
    edges = np.quantile(margin, np.linspace(0, 1, bins + 1))
    out = []
    for b in range(bins):
        inside = (margin >= edges[b]) & ((margin < edges[b + 1]) if b < bins - 1 else (margin <= edges[b + 1]))
        out.append({"margin": float(margin[inside].mean()), "beta_ratio": float(ratio[inside].mean()),
                    "mean_step": float(step[inside].mean())})
    return out


# ------------------------------------------------------------------------------------------ analysis
def t_interval(values: list[float]) -> dict[str, float]:
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "sd": math.nan, "p": math.nan, "mde80": math.nan, "n": n}
    sd = float(x.std(ddof=1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_1samp(x, 0.0).pvalue) if sd > 0 else (0.0 if mean else 1.0)
    mde = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd, "p": p, "mde80": float(mde), "n": n}


def curve(results: list[dict[str, Any]], arm: str, seed: int, temperature: float, metric: str) -> tuple[np.ndarray, np.ndarray]:
    runs = sorted((r for r in results if r["arm"] == arm and r["seed"] == seed
                   and r["label_temperature"] == temperature), key=lambda r: r["kl"])
    return np.array([r["kl"] for r in runs]), np.array([r[metric] for r in runs])


def matched_kl(results: list[dict[str, Any]], arm: str, baseline: str, temperature: float, seeds: int,
               metric: str = "reward") -> dict[str, Any]:
    """Δ(arm, baseline) per seed over the KL range every seed of both arms covers (ANALYSIS_PLAN)."""
    curves = {(a, s): curve(results, a, s, temperature, metric) for a in (arm, baseline) for s in range(seeds)}
    if any(len(kl) < 2 for kl, _ in curves.values()):
        return {"arm": arm, "baseline": baseline, "label_temperature": temperature, "overlap": None}
    low = max(kl.min() for kl, _ in curves.values())
    high = min(kl.max() for kl, _ in curves.values())
    if not 0 < low < high:
        return {"arm": arm, "baseline": baseline, "label_temperature": temperature, "overlap": None}
    grid = np.exp(np.linspace(math.log(low), math.log(high), 5))

    def at(a: str, s: int) -> np.ndarray:
        kl, values = curves[(a, s)]
        return np.interp(np.log(grid), np.log(kl), values)

    deltas = [float((at(arm, s) - at(baseline, s)).mean()) for s in range(seeds)]
    pointwise = [t_interval([float(at(arm, s)[g] - at(baseline, s)[g]) for s in range(seeds)]) for g in range(len(grid))]
    return {"arm": arm, "baseline": baseline, "label_temperature": temperature, "metric": metric,
            "overlap": [float(low), float(high)], "grid": grid.tolist(), "deltas": deltas,
            "summary": t_interval(deltas), "pointwise": pointwise}


def holm(p_values: list[float]) -> list[float]:
    order = np.argsort(p_values)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def analyse(results: list[dict[str, Any]], design: Design, datasets: list[dict[str, Any]]) -> dict[str, Any]:
    arms = [a.name for a in design.arms]
    primary = [matched_kl(results, PRIMARY, b, t, design.seeds) for t in design.label_temperatures
               for b in BASELINES if b in arms and PRIMARY in arms]
    p_values = [c["summary"]["p"] for c in primary if c["overlap"]]
    for c, adjusted in zip([c for c in primary if c["overlap"]], holm(p_values) if p_values else []):
        c["summary"]["p_holm"] = adjusted
    secondary = [matched_kl(results, a, "DPO", t, design.seeds) for t in design.label_temperatures
                 for a in arms if a not in ("DPO", PRIMARY)]
    win_rates = [matched_kl(results, PRIMARY, b, t, design.seeds, "win_rate") for t in design.label_temperatures
                 for b in BASELINES if b in arms and PRIMARY in arms]
    ablation_names = [a.name for a in design.ablation_arms]
    ablation = [matched_kl(results, a, "DPO", design.ablation_temperature, design.seeds)
                for a in [n for n in arms if n.startswith("ε-DPO")] + ablation_names]
    by_cell: dict[tuple[str, float, float], list[dict[str, Any]]] = {}
    for r in results:
        by_cell.setdefault((r["arm"], r["beta"], r["label_temperature"]), []).append(r)
    cells_table = [{"arm": a, "beta": b, "label_temperature": t, "kl": t_interval([r["kl"] for r in rs]),
                    "reward": t_interval([r["reward"] for r in rs]), "win_rate": t_interval([r["win_rate"] for r in rs]),
                    "final_beta": float(np.mean([r["final_beta"] for r in rs])),
                    "max_kl_se": max(r["kl_se"] for r in rs)} for (a, b, t), rs in by_cell.items()]
    binding = []
    for t in design.label_temperatures:
        for a in arms:
            kls = {c["beta"]: c["kl"]["mean"] for c in cells_table if c["arm"] == a and c["label_temperature"] == t}
            if len(kls) >= 2:
                low_beta, high_beta = min(kls), max(kls)
                spread = kls[low_beta] - kls[high_beta]
                worst_se = max(c["max_kl_se"] for c in cells_table if c["arm"] == a and c["label_temperature"] == t)
                binding.append({"arm": a, "label_temperature": t, "kl_ratio": kls[low_beta] / kls[high_beta],
                                "kl_range": spread, "worst_kl_se_over_range": worst_se / abs(spread) if spread else math.inf})
    noise = [{"label_temperature": t,
              "label_noise": float(np.mean([d["label_noise"] for d in datasets if d["label_temperature"] == t])),
              "tie_rate": float(np.mean([d["tie_rate"] for d in datasets if d["label_temperature"] == t]))}
             for t in design.label_temperatures]
    return {"primary": primary, "secondary": secondary, "win_rates": win_rates, "ablation": ablation,
            "cells": cells_table, "binding": binding, "noise": noise, "fig4a": fig4a_summary(results, design)}


def fig4a_cell(design: Design) -> tuple[str, float, float]:
    """The runs Fig. 4a is drawn from: the primary arm at the middle β₀ and the lowest label noise."""
    return PRIMARY, sorted(design.betas)[len(design.betas) // 2], design.label_temperatures[0]


def fig4a_summary(results: list[dict[str, Any]], design: Design) -> dict[str, Any] | None:
    """Each octile's β_i/β₀ and mean step, with a 95 % interval across seeds."""
    arm, beta0, temperature = fig4a_cell(design)
    runs = [r for r in results if r["arm"] == arm and r["beta"] == beta0
            and r["label_temperature"] == temperature and "fig4a_bins" in r]
    if not runs:
        return None
    bins = []
    for b in range(len(runs[0]["fig4a_bins"])):
        bins.append({"margin": t_interval([r["fig4a_bins"][b]["margin"] for r in runs]),
                     "beta_ratio": t_interval([r["fig4a_bins"][b]["beta_ratio"] for r in runs]),
                     "mean_step": t_interval([r["fig4a_bins"][b]["mean_step"] for r in runs])})
    return {"arm": arm, "beta0": beta0, "label_temperature": temperature, "bins": bins}


# ------------------------------------------------------------------------------------------ report
def plot_frontier(results: list[dict[str, Any]], design: Design, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperatures = design.label_temperatures
    fig, axes = plt.subplots(1, len(temperatures), figsize=(6.2 * len(temperatures), 4.6), squeeze=False)
    for ax, t in zip(axes[0], temperatures):
        for i, arm in enumerate(a.name for a in design.arms):
            color = f"C{i}"
            runs = [r for r in results if r["arm"] == arm and r["label_temperature"] == t]
            ax.scatter([r["kl"] for r in runs], [r["reward"] for r in runs], s=7, alpha=0.35, color=color)
            per_beta = [[r for r in runs if r["beta"] == b] for b in sorted(design.betas)]
            kl = [t_interval([r["kl"] for r in rs]) for rs in per_beta if rs]
            reward = [t_interval([r["reward"] for r in rs]) for rs in per_beta if rs]
            x = [k["mean"] for k in kl]
            ax.plot(x, [r["mean"] for r in reward], color=color, marker="o", ms=3, label=arm)
            ax.fill_between(x, [r["low"] for r in reward], [r["high"] for r in reward], color=color, alpha=0.15)
        ax.set_xscale("log")
        ax.set(xlabel="KL(π_θ‖π_ref), nats per completion", ylabel="gold reward of sampled completions",
               title=f"label temperature {t:g}")
        ax.legend(fontsize=8)
    fig.suptitle("Reward–KL frontier: points are seeds, lines mean over seeds per β, bands 95 % intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fig4a(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    x = [b["margin"]["mean"] for b in summary["bins"]]
    for ax, key, label in ((axes[0], "mean_step", "mean step s_i (+1: β_i lowered, −1: raised)"),
                           (axes[1], "beta_ratio", "β_i / β₀ at the pair's visit")):
        y = [b[key]["mean"] for b in summary["bins"]]
        err = [[m - b[key]["low"] for m, b in zip(y, summary["bins"])], [b[key]["high"] - m for m, b in zip(y, summary["bins"])]]
        ax.errorbar(x, y, yerr=err, marker="s", capsize=3)
        ax.set(xlabel="reference margin log π_ref(y_w|x) − log π_ref(y_l|x) (octile mean)", ylabel=label)
    axes[0].axhline(0.0, color="grey", lw=0.8, ls=":")
    fig.suptitle(f"{summary['arm']}, β₀ = {summary['beta0']:g}, label temperature {summary['label_temperature']:g}: "
                 "per-pair β against the reference margin (95 % intervals over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(summary: dict[str, float], digits: int = 3) -> str:
    if math.isnan(summary.get("low", math.nan)):
        return f"{summary['mean']:+.{digits}f}"
    return f"{summary['mean']:+.{digits}f} [{summary['low']:+.{digits}f}, {summary['high']:+.{digits}f}]"


def comparison_rows(comparisons: list[dict[str, Any]], holm_column: bool, metric: str = "reward") -> list[str]:
    head = f"| comparison | label T | KL range | Δ {metric}, 95 % CI | p | " + ("p (Holm) | " if holm_column else "") + "detectable Δ (80 %) |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in comparisons:
        name = f"{c['arm']} − {c['baseline']}"
        if not c["overlap"]:
            rows.append(f"| {name} | {c['label_temperature']:g} | no common KL range | | |" + (" |" if holm_column else "") + " |")
            continue
        s = c["summary"]
        holm_cell = f" {s.get('p_holm', math.nan):.3f} |" if holm_column else ""
        rows.append(f"| {name} | {c['label_temperature']:g} | {c['overlap'][0]:.2f}–{c['overlap'][1]:.2f} | {fmt(s)} | "
                    f"{s['p']:.3f} |{holm_cell} {s['mde80']:.3f} |")
    return rows


def write_page(report: dict[str, Any], design: Design, meta: dict[str, Any], docs: Path, stem: str) -> Path:
    analysis = report["analysis"]
    cell_rows = ["| arm | label T | β₀ | KL (95 % CI) | reward (95 % CI) | win rate vs SFT | final β | worst KL se |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in sorted(analysis["cells"], key=lambda c: (c["label_temperature"], c["arm"], c["beta"])):
        cell_rows.append(f"| {c['arm']} | {c['label_temperature']:g} | {c['beta']:g} | {c['kl']['mean']:.2f} "
                         f"[{c['kl']['low']:.2f}, {c['kl']['high']:.2f}] | {c['reward']['mean']:.3f} "
                         f"[{c['reward']['low']:.3f}, {c['reward']['high']:.3f}] | {c['win_rate']['mean']:.3f} | "
                         f"{c['final_beta']:.4f} | {c['max_kl_se']:.3f} |")
    binding = ["| arm | label T | KL(smallest β) / KL(largest β) | KL range | worst KL se / range |", "|---|---:|---:|---:|---:|"]
    binding += [f"| {b['arm']} | {b['label_temperature']:g} | {b['kl_ratio']:.1f}× | {b['kl_range']:.2f} | "
                f"{100 * b['worst_kl_se_over_range']:.1f} % |" for b in analysis["binding"]]
    noise = ["| label temperature T | label noise (untied pairs labelled against the gold order) | ties |", "|---:|---:|---:|"]
    noise += [f"| {n['label_temperature']:g} | {100 * n['label_noise']:.1f} % | {100 * n['tie_rate']:.1f} % |"
              for n in analysis["noise"]]
    fig4a = analysis["fig4a"]
    fig4a_rows = []
    if fig4a:
        fig4a_rows = ["| reference margin (octile mean) | β_i / β₀ (95 % CI over seeds) | mean step s_i (95 % CI) |",
                      "|---:|---:|---:|"]
        fig4a_rows += [f"| {b['margin']['mean']:+.2f} | {b['beta_ratio']['mean']:.4f} "
                       f"[{b['beta_ratio']['low']:.4f}, {b['beta_ratio']['high']:.4f}] | {fmt(b['mean_step'])} |"
                       for b in fig4a["bins"]]
    sft = report["sft"]
    text = f"""# Does the adaptive β help? A controlled experiment

Generated by `examples/controlled_frontier.py`; rerunning it rewrites everything but the verdict above
and the reading at the end, which are written by hand from these numbers. Raw results: [{stem}.json]({stem}.json).

Command (from the repository root):

    {meta['command']}

Machine: {meta['machine']}. Run on {meta['date']}; wall time {meta['wall_minutes']:.1f} min for
{meta['runs']} training runs with {design.workers} worker processes (one torch thread each), the SFT
model and the data.

## Design

| choice | value | why |
|---|---|---|
| task | prompt = BOS + {design.task.prompt_tokens} of {design.task.content_tokens} content tokens; completion = {design.task.completion_tokens} tokens, no EOS | fixed-length completions keep length out of the reward and the KL, so a policy cannot win by stopping early |
| gold reward | tokens that appear in the prompt − tokens repeating their predecessor, in [−{design.task.completion_tokens - 1}, {design.task.completion_tokens}] | graded, depends on the prompt, and its maximum needs both copying and variety, so it is not reached by a degenerate policy |
| SFT corpus | each token copies a prompt token with p = {design.task.copy_probability}, else uniform | the SFT policy then spreads its reward over many values, so sampled pairs differ by a graded amount |
| model | Llama, hidden {design.hidden_size}, {design.layers} layers, 4 heads, {sft['parameters']:,} parameters | small enough for {meta['runs']} runs to the end in the hour on 2 cores; big enough to learn the corpus (SFT loss {sft['final_loss']:.3f}) |
| SFT | {design.sft_steps} steps × {design.sft_batch_size} fresh sequences, AdamW lr {design.sft_learning_rate:g} cosine | fresh samples each step: the model learns the corpus's distribution, not a fixed set |
| reference | the SFT model, shared by every run | seeds then vary only what preference optimisation sees |
| preference pairs | per seed {design.train_pairs:,} prompts × 2 SFT samples, labelled a ≻ b with probability σ((r_a − r_b)/T) | Bradley–Terry sampling gives realistic, reward-dependent label noise; T is the noise knob |
| label temperatures | T ∈ {{{', '.join(f'{t:g}' for t in design.label_temperatures)}}} | a low and a high label-noise level (rates measured below) |
| training | one epoch: {design.steps} steps × {design.batch_size} pairs, AdamW lr {design.learning_rate:g} cosine, 10 % warm-up, padded batches, seed = the data seed | one pass over fresh pairs is how preference data is used, and no pair can be memorised |
| arms | {', '.join(a.name for a in design.arms)}; ablation {', '.join(a.name for a in design.ablation_arms) or '—'} (at T = {design.ablation_temperature:g}) | the paper's comparison plus β-DPO; with the two ε-DPO arms the ablation is a 2 × 2 factorial over ε_s × ε_c |
| TR-DPO | reference ← 0.6·policy + 0.4·reference every {max(1, design.steps // design.tr_dpo_updates)} steps | {design.tr_dpo_updates} soft updates per run: TRL's 512-step default would never fire in {design.steps} steps |
| β grid | {{{', '.join(f'{b:g}' for b in design.betas)}}} | a {max(design.betas) / min(design.betas):g}× span of β, chosen so that KL spans at least 3× (checked below) without the smallest β collapsing |
| seeds | {design.seeds} per cell | pairs the arms by seed (same data, order and evaluation samples), for a paired test |
| evaluation | {design.eval_prompts:,} held-out prompts × {design.samples_per_prompt} samples at temperature 1 | the same samples give gold reward, the win rate against SFT samples (ties half), and KL: the mean over samples of Σ_t KL(π_θ(·\\|x, y<t) ‖ π_ref(·\\|x, y<t)), exact at each position (`epsdpo.evaluation.sequence_kls`); the plain mean of log π_θ(y\\|x) − log π_ref(y\\|x), unbiased too but noisier, is in the JSON as a check |

## Analysis plan

{ANALYSIS_PLAN}
## Validity checks

Label noise, mean over seeds:

{chr(10).join(noise)}

β binds: final KL against β, and the KL standard error against the range it must resolve:

{chr(10).join(binding)}

## Primary result: ε-DPO (ε = 0.01) at matched KL

Δ is the seed-paired mean difference in gold reward over the common KL range (ANALYSIS_PLAN).

{chr(10).join(comparison_rows(analysis['primary'], True))}

The same comparison on win rate against the SFT policy:

{chr(10).join(comparison_rows(analysis['win_rates'], False, 'win rate'))}

![frontier]({stem}.png)

## Secondary: every arm against DPO

{chr(10).join(comparison_rows(analysis['secondary'], False))}

## ε_s × ε_c ablation (label temperature {design.ablation_temperature:g}), against DPO

{chr(10).join(comparison_rows(analysis['ablation'], False))}

## Per-pair β against the reference margin (the paper's Fig. 4a)

{f"{fig4a['arm']}, β₀ = {fig4a['beta0']:g}, label temperature {fig4a['label_temperature']:g}: each pair's β_i at its visit over β₀, averaged in octiles of the reference margin; 95 % intervals across seeds." if fig4a else "(no ε-DPO runs)"}

{chr(10).join(fig4a_rows)}

{f"![fig4a]({stem}_fig4a.png)" if fig4a else ""}

## Every cell

{chr(10).join(cell_rows)}
"""
    return write_page_keeping_reading(docs / f"{stem}.md", text)


# ------------------------------------------------------------------------------------------ main
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__}"


def run(design: Design, out: Path, docs: Path, stem: str, command: str) -> dict[str, Any]:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    design_file = out / "design.json"
    if design_file.is_file() and json.loads(design_file.read_text()) != json.loads(json.dumps(asdict(design))):
        raise SystemExit(f"{out} holds runs of another design: pass another --out or remove it")
    design_file.write_text(json.dumps(asdict(design), indent=1))

    torch.set_num_threads(min(design.workers, os.cpu_count() or 1))
    if not (out / "sft" / "config.json").is_file():
        print("SFT on the synthetic corpus ...", flush=True)
        (out / "sft_meta.json").write_text(json.dumps(train_sft(design, out / "sft")))
    sft_meta = json.loads((out / "sft_meta.json").read_text())
    sft = load_sft(out / "sft")
    if not (out / "sft_eval.json").is_file():
        prompts = held_out_prompts(design)
        rewards = [design.task.gold_reward(p, a) for p, a in zip(prompts, sample(sft, design, prompts, seed=99))]
        (out / "sft_eval.json").write_text(json.dumps({"rewards": rewards}))
    sft_meta["reward"] = float(np.mean(json.loads((out / "sft_eval.json").read_text())["rewards"]))
    datasets_file = out / "datasets.json"
    if not datasets_file.is_file():
        print("preference data ...", flush=True)
        stats = [s for seed in range(design.seeds) for s in build_datasets(design, sft, seed, out)]
        datasets_file.write_text(json.dumps(stats))
    datasets = json.loads(datasets_file.read_text())

    grid = cells(design)
    results_dir = out / "results"
    results_dir.mkdir(exist_ok=True)
    todo = [c for c in grid if not (results_dir / f"{c.key}.json").is_file()]
    print(f"{len(grid)} runs, {len(todo)} to train, {design.workers} workers", flush=True)
    with ProcessPoolExecutor(design.workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(design, out)) as pool:
        for done, (cell, result) in enumerate(zip(todo, pool.map(run_cell, todo)), 1):
            (results_dir / f"{cell.key}.json").write_text(json.dumps(result))
            print(f"[{done}/{len(todo)}] {cell.arm.name:>20} β₀={cell.beta:<5g} seed {cell.seed} T={cell.label_temperature:g}: "
                  f"KL {result['kl']:.2f}  reward {result['reward']:.3f}  ({result['train_seconds']:.0f}+"
                  f"{result['eval_seconds']:.0f} s)", flush=True)
    results = [json.loads((results_dir / f"{c.key}.json").read_text()) for c in grid]
    # The page's wall time is that of the invocations that did the work, not of a rerun that only reports
    walls_file = out / "wall_minutes.json"
    walls = json.loads(walls_file.read_text()) if walls_file.is_file() else []
    if todo:
        walls.append((time.perf_counter() - started) / 60)
        walls_file.write_text(json.dumps(walls))

    analysis = analyse(results, design, datasets)
    report = {"design": asdict(design), "sft": sft_meta, "datasets": datasets, "analysis": analysis, "runs": results}
    docs.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d"), "runs": len(grid),
            "wall_minutes": sum(walls) if walls else (time.perf_counter() - started) / 60}
    report["meta"] = meta
    (docs / f"{stem}.json").write_text(json.dumps(report, indent=1, allow_nan=True))
    plot_frontier(results, design, docs / f"{stem}.png")
    if analysis["fig4a"]:
        plot_fig4a(analysis["fig4a"], docs / f"{stem}_fig4a.png")
    page = write_page(report, design, meta, docs, stem)
    print(f"wrote {page} ({meta['wall_minutes']:.1f} min)")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny grid (≤ 3 minutes): checks the pipeline, not the question")
    ap.add_argument("--out", type=Path, help="where runs are kept (default outputs/controlled_frontier[_quick])")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs", help="where the page, plots and JSON go")
    ap.add_argument("--workers", type=int, help="worker processes (default 2: one per core here)")
    a = ap.parse_args()
    design = QUICK if a.quick else Design()
    if a.workers:
        design = replace(design, workers=a.workers)
    out = a.out or Path("outputs") / ("controlled_frontier_quick" if a.quick else "controlled_frontier")
    stem = "controlled_frontier_quick" if a.quick else "controlled_frontier"
    run(design, out, a.docs, stem, "python examples/controlled_frontier.py" + (" --quick" if a.quick else ""))


if __name__ == "__main__":
    main()
