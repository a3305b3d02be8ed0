"""The bundled demo preference dataset (instruction following with a programmatic gold reward).

The rows live in gzip JSON Lines files next to this module (``demo/train.jsonl.gz``,
``demo/test.jsonl.gz``), so they ship inside the wheel; ``scripts/make_demo_data.py``
regenerates them. Train rows are conversational pairs sampled from SmolLM2-135M-Instruct and
ranked by :mod:`epsdpo.data.demo_scorer`; test rows are held-out prompts with their instruction
spec, for scoring a trained model's answers.

Columns — train: ``prompt``, ``chosen``, ``rejected`` (message lists), ``instructions`` (the spec
as JSON text), ``chosen_score``, ``rejected_score``. Test: ``prompt``, ``instructions``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Literal

__all__ = ["DEMO_DIR", "demo_dataset", "demo_rows"]

DEMO_DIR = Path(__file__).parent / "demo"


def demo_rows(split: Literal["train", "test"] = "train", directory: str | Path = DEMO_DIR) -> list[dict[str, Any]]:
    """The raw rows of a split, as Python dicts. `directory`: another set in the same files, such as
    a larger one built by scripts/make_demo_data.py --out."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(directory) / f"{split}.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"the demo data file {path.name} is missing; run scripts/make_demo_data.py")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def demo_dataset(split: Literal["train", "test"] = "train", directory: str | Path = DEMO_DIR) -> Any:
    """The demo split as a ``datasets.Dataset``."""
    import datasets

    return datasets.Dataset.from_list(demo_rows(split, directory))
