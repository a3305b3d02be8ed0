"""What a loaded preference dataset looks like: the :class:`DataReport` and how it is computed.

Length percentiles come from the store's span lengths; truncation and padding figures come from
the same Rust :class:`~epsdpo.Collator` training uses, so they describe the batches training will
really see rather than an approximation of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from epsdpo._core import LAYOUTS, Collator, PreferenceStore, Truncation

__all__ = ["LAYOUTS", "DataReport", "compute_stats"]

PERCENTILES = (50, 90, 95, 99)


@dataclass
class DataReport:
    """Summary of one :func:`~epsdpo.data.load_preferences` call.

    ``skipped`` counts bad rows by reason code; ``skipped_rows`` lists the first ones as
    ``[row, code, message]``. ``lengths`` maps ``prompt`` / ``chosen`` / ``rejected`` /
    ``sequence`` (prompt + one completion) to ``min``, ``mean``, ``p50``…``p99``, ``max``.
    ``padding`` is the estimated fraction of batch cells that are padding, per layout, for
    random batches of ``padding_batch_pairs`` pairs under the truncation settings.
    ``empty_after_truncation`` and ``identical_after_truncation`` count the pairs training drops.
    """

    source: str = ""
    format: str = "standard"
    implicit_prompt: bool = False
    num_rows: int = 0
    num_pairs: int = 0
    num_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_rows: list[list[Any]] = field(default_factory=list)
    doubled_bos: int = 0
    eos_appended: int = 0
    lengths: dict[str, dict[str, float]] = field(default_factory=dict)
    max_length: int | None = None
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    prompt_truncation_mode: str = "keep_end"
    num_truncated: int = 0
    empty_after_truncation: int = 0
    identical_after_truncation: int = 0
    """Pairs whose chosen and rejected are the same tokens after tokenization and truncation: they
    have nothing to learn (loss ln 2, a gradient of rounding noise), so training drops them."""
    padding: dict[str, float] = field(default_factory=dict)
    padding_batch_pairs: int = 0
    fingerprint: str | None = None
    cache_path: str | None = None
    cache_hit: bool = False
    seconds: float = 0.0

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        names = {f.name for f in dataclasses.fields(cls)}
        if "truncation_mode" in data:  # a report cached before the field's rename
            data = {"prompt_truncation_mode": data["truncation_mode"], **data}
        return cls(**{k: v for k, v in data.items() if k in names})

    def __str__(self) -> str:
        lines = [
            f"{self.num_pairs} pairs from {self.num_rows} rows of {self.source} "
            f"({self.format}{', implicit prompt' if self.implicit_prompt else ''}), {self.num_tokens} tokens"
            + (" [cache hit]" if self.cache_hit else ""),
        ]
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        if self.doubled_bos or self.eos_appended:
            lines.append(f"doubled BOS collapsed: {self.doubled_bos}, EOS appended: {self.eos_appended}")
        if self.lengths:
            head = "tokens      " + "".join(f"{k:>8}" for k in ("min", "mean", *(f"p{p}" for p in PERCENTILES), "max"))
            lines.append(head)
            for part, s in self.lengths.items():
                vals = [s["min"], s["mean"], *(s[f"p{p}"] for p in PERCENTILES), s["max"]]
                lines.append(f"{part:<12}" + "".join(f"{v:>8.0f}" for v in vals))
        limits = (f"max_length={self.max_length}, max_prompt_length={self.max_prompt_length}, "
                  + (f"max_completion_length={self.max_completion_length}, " if self.max_completion_length else "")
                  + self.prompt_truncation_mode)
        lines.append(f"truncated: {self.num_truncated} pairs ({limits}); emptied by truncation: {self.empty_after_truncation}; "
                     f"chosen identical to rejected (dropped): {self.identical_after_truncation}")
        if self.padding:
            pads = ", ".join(f"{k} {v:.1%}" for k, v in self.padding.items())
            lines.append(f"padding at {self.padding_batch_pairs} pairs/batch: {pads}")
        if self.cache_path:  # the same store file training accepts as its data
            lines.append(f"cached store: {self.cache_path}")
        return "\n".join(lines)


def _describe(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {"min": 0.0, "mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}, "max": 0.0}
    q = np.percentile(x, PERCENTILES)
    return {
        "min": float(x.min()),
        "mean": float(x.mean()),
        **{f"p{p}": float(v) for p, v in zip(PERCENTILES, q)},
        "max": float(x.max()),
    }


def padding_fraction(store: PreferenceStore, collator: Collator, batch_pairs: int, seed: int = 0) -> float:
    """Fraction of padding cells over random batches covering the whole store (the Rust
    collator is fast enough to lay out every pair: about 10k pairs per 0.1 s)."""
    order = np.random.default_rng(seed).permutation(len(store))
    cells = real = 0
    for start in range(0, len(order), batch_pairs):
        batch = collator(store, order[start : start + batch_pairs])
        mask = batch["attention_mask"]
        cells += mask.size
        real += int(np.count_nonzero(mask))
    return 1.0 - real / cells if cells else 0.0


def compute_stats(
    store: PreferenceStore,
    *,
    truncation: Truncation | None = None,
    batch_pairs: int = 8,
    seed: int = 0,
) -> DataReport:
    """A report with the store's lengths, truncation counts and padding estimates filled in."""
    truncation = Truncation() if truncation is None else truncation
    p, c, r = (x.astype(np.int64) for x in store.lengths())
    report = DataReport(
        num_pairs=len(store),
        num_tokens=int(store.num_tokens),
        max_length=truncation.max_length,
        max_prompt_length=truncation.max_prompt_length,
        max_completion_length=truncation.max_completion_length,
        prompt_truncation_mode=truncation.prompt_truncation_mode,
        padding_batch_pairs=batch_pairs,
    )
    report.lengths = {
        "prompt": _describe(p),
        "chosen": _describe(c),
        "rejected": _describe(r),
        "sequence": _describe(np.concatenate([p + c, p + r])),
    }
    t = Collator(truncation=truncation).truncated_lengths(store)
    report.num_truncated = int(t["num_truncated"])
    report.empty_after_truncation = len(t["empty"])
    report.identical_after_truncation = len(t["identical"])
    if len(store):
        # Pairs a truncation empties are dropped by the collator (skip_empty), as training would.
        report.padding = {
            layout: padding_fraction(store, Collator(layout, truncation=truncation, skip_empty=True), batch_pairs, seed)
            for layout in LAYOUTS
        }
    return report
