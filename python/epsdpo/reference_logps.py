"""Reference log-probs computed once before training (TRL's `precompute_ref_log_probs`).

The reference of `dpo` and `beta_dpo` never changes, so the reference log-probs of every pair are a
fixed function of the data: one no-grad pass over a store replaces a reference forward in every
micro-batch, and the reference model need not stay in memory. They are the same numbers the
reference forward gives during training, scored by the same kernel under the same autocast, so a
run with them trains as a run without them (tests/test_reference_logps.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from epsdpo.models import AdapterFreeReference
from epsdpo.scoring import batch_logps

if TYPE_CHECKING:
    from epsdpo._core import Collator, PreferenceStore
    from epsdpo.precision import Precision


@torch.no_grad()
def precompute_reference_logps(
    reference: nn.Module | AdapterFreeReference,
    store: PreferenceStore,
    collator: Collator,
    batch_size: int,
    precision: Precision,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """[len(store), 2]: the reference's (chosen, rejected) sequence log-probs of each pair, by its
    index in `store`; NaN for pairs that truncation skips (they never reach a loss).

    Every rank scores every pair in the same batches, so a sharded (FSDP) reference runs the same
    forwards on all ranks and no exchange of results is needed."""
    from tqdm.auto import tqdm

    model, scope = reference, nullcontext
    if isinstance(reference, AdapterFreeReference):  # the PEFT policy with its adapters off
        model, scope = reference.policy, reference.disabled
    table: Tensor | None = None
    starts = range(0, len(store), batch_size)
    for start in tqdm(starts, desc="Reference log-probs", unit="batch", disable=not progress):
        indices = np.arange(start, min(start + batch_size, len(store)), dtype=np.uint32)
        batch = collator(store, indices)
        if len(batch["pair_ids"]) == 0:
            continue
        with scope(), precision.autocast():
            # With no reference and ε = 0, the "policy" log-probs are the model's own: the reference's.
            logps = batch_logps(model, None, batch, 0.0, chunk_size).policy
        if table is None:
            table = torch.full((len(store), 2), torch.nan, dtype=logps.dtype, device=logps.device)
        rows = torch.as_tensor(batch["pair_indices"], device=logps.device).long()
        table[rows] = torch.stack(logps.chunk(2), dim=1)
    if table is None:
        raise ValueError("no pair of the dataset survives truncation")
    return table


def lookup(table: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
    """The precomputed (chosen, rejected) reference log-probs [B] of a batch's pairs."""
    rows = table[torch.as_tensor(batch["pair_indices"], device=table.device).long()]
    return rows[:, 0], rows[:, 1]
