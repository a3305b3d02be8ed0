"""Preference data in: raw rows → validated, cached :class:`~epsdpo.PreferenceStore`.

- :func:`load_preferences` reads a ``datasets.Dataset`` / ``DatasetDict`` / ``IterableDataset`` /
  iterable of row dicts / local file or folder / hub id, a batch at a time, in the standard,
  conversational or implicit-prompt format and returns ``(store, report)``.
- :class:`DataReport` is that report: pairs, skipped rows, token-length percentiles, truncation
  and padding estimates.
- :func:`demo_dataset` is the bundled instruction-following preference set, and
  :mod:`~epsdpo.data.demo_scorer` its programmatic gold scorer.
"""

from epsdpo.data import demo_scorer
from epsdpo.data.demo import demo_dataset
from epsdpo.data.ingest import DataSourceError, InvalidRowError, load_preferences
from epsdpo.data.stats import DataReport, compute_stats

__all__ = [
    "DataReport",
    "DataSourceError",
    "InvalidRowError",
    "compute_stats",
    "demo_dataset",
    "demo_scorer",
    "load_preferences",
]
