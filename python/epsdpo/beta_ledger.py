"""The per-pair β ledger of a whole run, every rank's pairs booked once, and where each rank's part
of it lives in a checkpoint.

Each rank's `KlController` books the pairs that rank trained (its `ledger()`: per pair id the counts
of +1/0/−1 steps, the last step and its β_i). β and its history are the same on every rank, the
ledgers are not: under torchrun the sampler gives each rank its own pairs. So at the end of a run
`beta_ledger.npz` is built from every rank's ledger, and each checkpoint keeps every rank's
controller state, so that a resumed rank continues its own ledger.

`beta_ledger.npz` holds `beta_history` and one row per (pair id, rank that trained it), sorted by
pair id then rank: `pair_ids`, `rank`, `plus`, `zero`, `minus`, `last_step`, `last_beta`. A pair
trained on two ranks (in different epochs) has a row for each; its totals are the sums over its
rows. Every pair-step trained is counted once: the sum of `plus + zero + minus` is the number of
pair-steps the run trained. A single-process run's file is the controller's ledger plus a `rank`
column of zeros.
"""

from __future__ import annotations

import numpy as np

from epsdpo._core import KlController

# rank 0's controller keeps the name it has always had, so that a one-process checkpoint is unchanged
# and older readers find β where they did; the other ranks' controllers lie beside it
KL_STATE = "kl_controller.bin"
LEDGER_COLUMNS = ("pair_ids", "plus", "zero", "minus", "last_step", "last_beta")


def kl_state_files(world_size: int) -> list[str]:
    """The checkpoint file of each rank's controller state, in rank order."""
    return [KL_STATE, *(f"kl_controller_rank{rank}.bin" for rank in range(1, world_size))]


def merged_ledger(rank_states: list[bytes]) -> dict[str, np.ndarray]:
    """The columns of `beta_ledger.npz` (without `beta_history`) from each rank's controller state."""
    parts = []
    for rank, state in enumerate(rank_states):
        controller = KlController(1.0, 0.0)  # replaced whole by the loaded state, which is validated (CRC-32)
        controller.load_state_dict({"state": state})
        ledger = controller.ledger()
        parts.append({**ledger, "rank": np.full(len(ledger["pair_ids"]), rank, dtype=np.uint32)})
    columns = {name: np.concatenate([part[name] for part in parts]) for name in (*LEDGER_COLUMNS, "rank")}
    order = np.lexsort((columns["rank"], columns["pair_ids"]))  # by pair id, then rank
    return {name: values[order] for name, values in columns.items()}
