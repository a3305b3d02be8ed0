"""What the training loop eats: preference data as Rust stores, truncated and checked once, sampled
into accumulation cycles and collated one cycle ahead in a background thread.

The Rust collator and sampler do the work (and release the GIL), so collating the next cycle while
the current one trains hides the data path behind the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from epsdpo._core import BatchSampler, Collator, PreferenceStore, Truncation, TruncationError
from epsdpo.config import TrainConfig
from epsdpo.distributed import DistInfo

if TYPE_CHECKING:
    from epsdpo._core import Batch


def make_collator(config: TrainConfig, tokenizer: Any) -> Collator:
    pad = getattr(tokenizer, "pad_token_id", None)
    return Collator(
        config.layout, truncation=config.truncation, pad_token_id=pad if pad is not None else 0,
        pad_to_multiple_of=config.pad_to_multiple_of, skip_empty=config.skip_invalid,
    )


def as_store(dataset: Any, config: TrainConfig, tokenizer: Any, collator: Collator, *,
             progress: bool, split: str = "train") -> tuple[PreferenceStore, dict[str, Any]]:
    """The dataset as a store, and its truncated lengths (checked: no emptied completion unless
    `skip_invalid`, and at least one pair to train on). Pairs whose chosen and rejected are the same
    tokens after truncation are counted in `lengths["identical"]`, warned about, and dropped by the
    collator in training and evaluation alike. `split` ("train" or "eval") names the data in messages.

    A path ending in .store or .epsdpo is a store file (`epsdpo prepare --output`, or a cache entry) and
    is mapped as it is; anything else goes through `load_preferences`, which caches the tokenized store
    in `config.dataset_cache_dir`: None there means the default cache directory (`$EPSDPO_CACHE`, else
    `$XDG_CACHE_HOME/epsdpo`, else `~/.cache/epsdpo`), "disabled" no caching."""
    from epsdpo.data.sources import is_store_path

    if is_store_path(dataset):
        dataset = PreferenceStore.load(dataset)
    if isinstance(dataset, PreferenceStore):
        store = dataset
    else:
        if tokenizer is None:
            raise ValueError("raw preference data needs a tokenizer: pass `tokenizer=` or a PreferenceStore")
        from epsdpo.data import load_preferences
        from epsdpo.data.cache import DEFAULT

        store, _ = load_preferences(
            dataset, tokenizer, truncation=collator.truncation,
            cache_dir=DEFAULT if config.dataset_cache_dir is None else config.dataset_cache_dir,
            skip_invalid=config.skip_invalid, max_row_bytes=config.max_row_bytes, progress=progress,
        )
    if len(store) == 0:
        raise ValueError("the preference dataset is empty")
    lengths = collator.truncated_lengths(store)
    empty, identical = lengths["empty"], lengths["identical"]
    limits = truncation_limits(collator.truncation)
    if len(empty) == len(store):
        raise ValueError(f"no pair can be trained on: every completion of all {len(store)} pairs is empty after "
                         f"truncation to {limits}")
    if len(empty) + len(identical) == len(store):
        others = f" and the other {len(empty)} an emptied completion" if len(empty) else ""
        raise ValueError(
            f"no pair can be {'trained' if split == 'train' else 'evaluated'} on: {len(identical)} of the {split} "
            f"data's {len(store)} pairs have the same chosen and rejected tokens after truncation to {limits}{others} "
            f"(first: pair {int(identical[0])}); such a pair has nothing to learn (its loss is ln 2 whatever the "
            "weights): raise the limits or fix the data")
    if len(empty) and not config.skip_invalid:
        error = TruncationError(
            f"pair {int(empty[0])}: a completion is empty after truncation to {limits} ({len(empty)} pairs like it); "
            "raise the limits or set skip_invalid=True to skip and count them"
        )
        error.pair_index = int(empty[0])
        raise error
    if len(identical):
        # Dropped by the collator (never fed to the model), and said once here: a prepared store has no
        # data report to count them in.
        warnings.warn(
            f"{split} data: {len(identical)} of {len(store)} pairs have the same chosen and rejected tokens after truncation to "
            f"{limits} (first: pair {int(identical[0])}); they are dropped, having nothing to learn",
            stacklevel=3)
    return store, lengths


def truncation_limits(truncation: Truncation) -> str:
    """The length limits as messages name them (max_completion_length only when set)."""
    return (f"max_length={truncation.max_length}, max_prompt_length={truncation.max_prompt_length}"
            + (f", max_completion_length={truncation.max_completion_length}" if truncation.max_completion_length else ""))


def check_vocabulary(store: PreferenceStore, model: nn.Module) -> None:
    """Every token id must index the model's embedding; a store tokenized for another vocabulary would
    otherwise fail deep inside the forward pass with a bare IndexError. The store's own bound settles
    it at once when it is small enough; otherwise its tokens are scanned."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None or (store.vocab_size is not None and store.vocab_size <= rows):
        return
    for index in range(len(store)):
        largest = max(int(part.max()) for part in store[index] if len(part))
        if largest >= rows:
            raise ValueError(
                f"pair {index}: token id {largest} is beyond the model's embedding ({rows} rows; the data's "
                f"vocab_size is {store.vocab_size}): was it tokenized with another tokenizer?"
            )


def make_sampler(config: TrainConfig, collator: Collator, lengths: dict[str, Any], dist: DistInfo) -> BatchSampler:
    chosen = lengths["prompt"] + lengths["chosen"]
    rejected = lengths["prompt"] + lengths["rejected"]
    if config.max_tokens_per_batch:
        mode = dict(mode="token_budget", max_tokens=config.max_tokens_per_batch, padded=not collator.packs_rows)
    else:
        mode = dict(mode="length_grouped" if config.group_by_length else "shuffle")
    return BatchSampler(chosen, rejected, config.per_device_train_batch_size, seed=config.seed,
                        world_size=dist.world_size, rank=dist.rank, **mode)


COLLATE_THREAD = "epsdpo-collate"  # the name prefix of CycleFeed's worker thread


class CycleFeed:
    """Accumulation cycles of collated micro-batches, each with the sampler state after it (what a
    checkpoint taken after that cycle must resume from) and whether it ends an epoch.

    Its collating thread lives while `cycles` runs: the pool is started there and shut down when the
    cycles run out, and `close()` (or leaving a `with` block) shuts it down when training stops early,
    since an abandoned generator is only finalised whenever the garbage collector gets to it."""

    def __init__(self, store: PreferenceStore, collator: Collator, sampler: BatchSampler, accumulation: int) -> None:
        self.store, self.collator, self.sampler, self.accumulation = store, collator, sampler, accumulation
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Stop the collating thread (a cycle being collated for nobody is dropped); safe to repeat."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CycleFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_cycle(self) -> tuple[list[np.ndarray], bool]:
        """The next cycle's pair indices, and whether it ends its epoch; a cycle never spans two epochs."""
        cycle: list[np.ndarray] = []
        while len(cycle) < self.accumulation:
            batch = next(self.sampler, None)
            if batch is None:
                self.sampler.set_epoch(self.sampler.epoch + 1)
                if cycle:
                    return cycle, True
                continue
            cycle.append(batch)
        # The epoch's batch count is read as it is now: under a token budget it may change by epoch
        return cycle, self.sampler.position == len(self.sampler)

    def _collate(self, cycle: list[np.ndarray]) -> list[Batch]:
        return [self.collator(self.store, indices) for indices in cycle]

    def cycles(self, count: int) -> Iterator[tuple[list[Batch], bytes, bool]]:
        """`count` cycles; the next one is collated in the background while the caller trains on this one."""
        if count <= 0:
            return
        pool = self._pool = self._pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix=COLLATE_THREAD)

        def submit() -> tuple[Any, bytes, bool]:
            cycle, ends_epoch = self._take_cycle()
            return pool.submit(self._collate, cycle), self.sampler.state_dict()["state"], ends_epoch

        try:
            pending, state, ends_epoch = submit()
            for index in range(count):
                batches, state_after, ended = pending.result(), state, ends_epoch
                if index + 1 < count:
                    pending, state, ends_epoch = submit()
                yield batches, state_after, ended
        finally:
            self.close()


def filler_batch(collator: Collator, store: PreferenceStore) -> Batch:
    """A batch that only keeps a rank in step with the others' collectives; its results are discarded."""
    for index in range(len(store)):
        batch = collator(store, np.array([index], dtype=np.uint32))
        if len(batch["pair_ids"]):
            return batch
    raise ValueError("no pair of the dataset survives truncation")
