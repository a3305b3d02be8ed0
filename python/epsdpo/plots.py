"""PNG plots of a run from its log history: β, the step fractions, reward margin and accuracy, loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANELS = {
    "beta": ("β (KL penalty) used by each step", ["kl/beta"]),
    "kl_steps": ("fraction of pairs relaxed (s=+1) / tightened (s=−1)", ["kl/relaxed_frac", "kl/tightened_frac"]),
    "rewards": ("reward margin and accuracy", ["rewards/margins", "rewards/accuracies", "eval_rewards/accuracies"]),
    "loss": ("loss", ["loss", "eval_loss"]),
}


def _draw(ax: Any, history: list[dict[str, Any]], title: str, keys: list[str]) -> None:
    for key in keys:
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(points) < 50 else None, label=key)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)


def plot_run(history: list[dict[str, Any]], output_dir: Path) -> list[Path]:
    """`training.png` (all panels) and one PNG per panel; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, keys) in zip(axes.flat, PANELS.values()):
        _draw(ax, history, title, keys)
    fig.tight_layout()
    written.append(output_dir / "training.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    for name, (title, keys) in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        _draw(ax, history, title, keys)
        fig.tight_layout()
        written.append(output_dir / f"{name}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
