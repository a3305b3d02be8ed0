"""The model card of a run: `final/README.md`, the file the Hugging Face Hub shows for a model folder.

TRL's trainers write one next to the weights; this one says what an ε-DPO run adds to a DPO run's
story: β at the start and at the end, ε, and the plot of β over the steps.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epsdpo.config import TrainConfig
from epsdpo.methods import method_class

TRAIN_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
EVAL_METRICS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
BETA_PLOT = "beta.png"


@dataclass
class RunFacts:
    """What the card reports besides the config, named by the trainer when the run ends."""

    steps: int
    beta_initial: float
    beta_final: float
    train_pairs: int
    world_size: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    base_model: str | None = None
    train_data: str | None = None
    eval_pairs: int | None = None
    eval_data: str | None = None
    # each resume of the run: step, checkpoint, and the settings changed then ({field: [old, new]})
    resumes: list[dict[str, Any]] = field(default_factory=list)


def describe_source(source: Any) -> str | None:
    """What names a model or dataset on the card: a path or hub id as given, a `datasets.Dataset`'s
    name, a model object's `name_or_path`; None when nothing names it (an in-memory store)."""
    if isinstance(source, (str, Path)):
        return str(source)
    name = (getattr(getattr(source, "info", None), "dataset_name", None)
            or getattr(getattr(source, "config", None), "_name_or_path", None))
    return str(name) if name else None


def _hub_id(name: str | None) -> str | None:
    """`name` when it reads as a hub id (owner/name, not a local path): only those belong in the
    card's metadata, which the Hub checks."""
    if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def _last(history: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[int | None, dict[str, float]]:
    """The step and `keys` of the last record holding the first key."""
    for record in reversed(history):
        if keys[0] in record:
            return record["step"], {k: record[k] for k in keys if k in record}
    return None, {}


def _front_matter(config: TrainConfig, run: RunFacts, library: str) -> list[str]:
    lines = ["---", f"library_name: {library}"]
    if base := _hub_id(run.base_model):
        lines.append(f"base_model: {base}")
    datasets = [d for d in (_hub_id(run.train_data), _hub_id(run.eval_data)) if d]
    if datasets:
        lines += ["datasets:", *(f"- {d}" for d in dict.fromkeys(datasets))]
    lines += ["tags:", "- epsdpo", "- dpo", f"- {config.method.replace('_', '-')}", "---"]
    return lines


def _pairs(count: int | None, source: str | None) -> str:
    return f"{count} preference pairs" + (f" (`{source}`)" if source else "")


def _settings(config: TrainConfig, run: RunFacts) -> list[str]:
    method = method_class(config.method)
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * run.world_size
    rows = [
        ("method", f"{method.title} (`{config.method}`)"),
        ("β", f"{run.beta_initial:.6g} at the start, {run.beta_final:.6g} at the end"),
        *method.card_rows(config),
        ("training data", _pairs(run.train_pairs, run.train_data)),
        ("evaluation data", _pairs(run.eval_pairs, run.eval_data) if run.eval_pairs is not None else "none"),
        ("optimizer steps", str(run.steps)),
        ("pairs per step", f"{per_step} ({config.per_device_train_batch_size} per device × "
                           f"{config.gradient_accumulation_steps} accumulated × {run.world_size} processes)"
         if not config.max_tokens_per_batch else
         f"variable: a budget of {config.max_tokens_per_batch} tokens per device batch × "
         f"{config.gradient_accumulation_steps} accumulated × {run.world_size} processes"),
        ("learning rate", f"{config.learning_rate:g}, {config.lr_scheduler_type} schedule, "
                          # transformers' constant schedule has no warm-up, whatever warmup_steps says
                          f"{0 if config.lr_scheduler_type == 'constant' else config.warmup_steps_for(run.steps)} "
                          "warm-up steps"),
    ]
    for resume in run.resumes:
        changed = "; ".join(f"{k} {old} → {new}" for k, (old, new) in resume.get("changed", {}).items())
        rows.append(("resumed", f"at step {resume['step']} from {resume['checkpoint']}"
                                + (f", changing {changed} from then on" if changed else ", settings unchanged")))
    return ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _results(run: RunFacts) -> list[str]:
    rows = []
    for keys in (TRAIN_METRICS, EVAL_METRICS):
        step, values = _last(run.history, keys)
        rows += [f"| {k} | {v:.4g} | {step} |" for k, v in values.items()]
    if not rows:
        return ["No metrics were logged."]
    return ["The last logged value of each metric (`metrics.jsonl` has them all):", "",
            "| metric | value | step |", "|---|---|---|", *rows]


def model_card(config: TrainConfig, run: RunFacts, *, beta_plot: str | None = None, library: str = "transformers") -> str:
    """The card's Markdown. `beta_plot`: the β plot's path relative to the card, when there is one."""
    method = method_class(config.method).title
    origin = f" from `{run.base_model}`" if run.base_model else ""
    lines = [
        *_front_matter(config, run, library), "",
        f"# {Path(config.output_dir).name}", "",
        f"A causal language model fine-tuned{origin} with {method} (epsdpo) on "
        f"{_pairs(run.train_pairs, run.train_data)}.", "",
        "## Training", "", *_settings(config, run), "",
        "## Results", "", *_results(run), "",
    ]
    if beta_plot:
        lines += ["## β during training", "", f"![β used by each optimizer step]({beta_plot})", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", ""]
    return "\n".join(lines)


def write_model_card(folder: Path, config: TrainConfig, run: RunFacts, plot: Path | None = None) -> Path:
    """Write `folder/README.md`, copying `plot` (the β plot) next to it so that its link resolves
    wherever the folder goes (the Hub included). Replaces the card PEFT writes for an adapter."""
    beta_plot = None
    if plot is not None and plot.is_file():
        shutil.copyfile(plot, folder / BETA_PLOT)
        beta_plot = BETA_PLOT
    library = "peft" if (folder / "adapter_config.json").exists() else "transformers"
    path = folder / "README.md"
    path.write_text(model_card(config, run, beta_plot=beta_plot, library=library))
    return path


def write_run_card(final: Path, config: TrainConfig, run: RunFacts, plot: Path | None) -> None:
    """`README.md` of a finished run's `final/` (rank 0, after the ledger and the plots), written into
    `final`: the staging folder that becomes `final/` once complete."""
    from epsdpo.checkpoint import write_file

    write_file(final / "README.md", lambda _: write_model_card(final, config, run, plot))
