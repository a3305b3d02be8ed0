"""Type stubs of the Rust extension ``epsdpo._core`` (kept true by tests/test_stubs.py)."""

from collections.abc import Sequence
from os import PathLike
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__version__: str

IntArray = npt.NDArray[np.integer[Any]]
Layout = Literal["padded", "packed", "shared_prompt"]

class EpsdpoError(ValueError):
    """Base class of every epsdpo data-path error."""

class InvalidPairError(EpsdpoError):
    """A preference pair failed validation; ``pair_index`` names it."""

    pair_index: int

class TruncationError(InvalidPairError):
    """Truncation left a completion with no tokens; ``pair_index`` names the pair."""

class StoreFileError(EpsdpoError):
    """A store file is truncated, corrupted, of another format version, or not a store; or the
    file of a loaded (memory-mapped) store was changed in place. When the damage is in one pair,
    ``pair_index`` names it."""

    pair_index: int

class ConfigError(EpsdpoError):
    """A configuration value is out of range."""

class StateError(EpsdpoError):
    """Saved sampler or controller state cannot be restored."""

class InternalError(RuntimeError):
    """A bug in epsdpo's Rust core (a panic), caught at the boundary; please report it."""

def _raise_panic(message: str) -> None:
    """Test hook: panics in Rust; arrives as :class:`InternalError`."""

class PreferenceStore:
    """Tokenized preference pairs in one contiguous token arena."""

    def __init__(self, vocab_size: int | None = None) -> None:
        """``vocab_size`` (1 to 2**32 - 1, or None for no check) bounds every token appended."""
    def append(
        self,
        prompt_tokens: IntArray,
        prompt_offsets: IntArray,
        chosen_tokens: IntArray,
        chosen_offsets: IntArray,
        rejected_tokens: IntArray,
        rejected_offsets: IntArray,
        ids: npt.NDArray[np.uint64] | None = None,
    ) -> tuple[int, int]:
        """Append many pairs (flat tokens + ``n + 1`` offsets each); all-or-nothing."""
    def add_pair(
        self, prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], id: int | None = None
    ) -> int: ...
    def __len__(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def vocab_size(self) -> int | None: ...
    @property
    def is_memory_mapped(self) -> bool: ...
    def lengths(
        self,
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32], npt.NDArray[np.uint32]]:
        """Per-pair ``(prompt, chosen, rejected)`` lengths."""
    def ids(self) -> npt.NDArray[np.uint64]: ...
    def __getitem__(
        self, index: int
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32], npt.NDArray[np.uint32]]: ...
    def pair_id(self, index: int) -> int: ...
    def save(self, path: str | PathLike[str]) -> None:
        """Write one checksummed file atomically (temporary file beside it, then rename).

        An unwritable path raises an ``OSError`` subclass whose ``filename`` is ``path``."""
    @staticmethod
    def load(path: str | PathLike[str]) -> PreferenceStore:
        """Memory-map a saved store after verifying its checksum and structure.

        A damaged file raises :class:`StoreFileError`; a missing or unreadable one an ``OSError``
        subclass (``FileNotFoundError``, ``PermissionError``, ...) whose message and ``filename``
        name ``path``.

        The store reads the file's pages for as long as it lives, so the file must not be
        truncated or rewritten in place meanwhile (``save`` to the same path is safe: it writes
        a new file and renames it). Truncation makes a read past the new end a SIGBUS, which
        kills the process; an in-place rewrite serves whatever bytes are there now. What can be
        detected is: every call that reads the store first compares the file's size and
        modification time with those at load and raises :class:`StoreFileError` on a change;
        and each pair a batch or lookup reads is re-checked (spans in order and in range,
        tokens below ``vocab_size``), raising :class:`StoreFileError` with ``pair_index`` set.
        A truncation racing a read cannot be caught: copy the file away before changing it.
        """

class Collator:
    """Turns pair indices into one batch layout: a dict of numpy arrays."""

    def __init__(
        self,
        layout: Layout = "padded",
        *,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        truncation_mode: Literal["keep_end", "keep_start"] = "keep_end",
        pad_token_id: int = 0,
        pad_to_multiple_of: int = 1,
        capacity: int | None = None,
        skip_empty: bool = False,
    ) -> None: ...
    def __call__(self, store: PreferenceStore, indices: IntArray | Sequence[int]) -> dict[str, Any]: ...
    def truncated_lengths(self, store: PreferenceStore) -> dict[str, Any]: ...
    @property
    def layout(self) -> Layout: ...
    @property
    def max_length(self) -> int | None: ...
    @property
    def max_prompt_length(self) -> int | None: ...
    @property
    def truncation_mode(self) -> Literal["keep_end", "keep_start"]: ...
    @property
    def pad_token_id(self) -> int: ...
    @property
    def pad_to_multiple_of(self) -> int: ...
    @property
    def capacity(self) -> int | None: ...
    @property
    def skip_empty(self) -> bool: ...

class BatchSampler:
    """Deterministic, resumable, rank-sharded batches of pair indices."""

    def __init__(
        self,
        chosen_lengths: IntArray,
        rejected_lengths: IntArray,
        batch_size: int = 8,
        *,
        mode: Literal["shuffle", "length_grouped", "token_budget"] = "shuffle",
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        mega_batch_mult: int = 50,
        max_tokens: int | None = None,
        padded: bool = True,
    ) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> BatchSampler: ...
    def __next__(self) -> npt.NDArray[np.uint32]: ...
    def epoch_batches(self, epoch: int) -> list[npt.NDArray[np.uint32]]: ...
    def set_epoch(self, epoch: int) -> None: ...
    @property
    def epoch(self) -> int: ...
    @property
    def position(self) -> int: ...
    def state_dict(self) -> dict[str, bytes]: ...
    def load_state_dict(self, state: dict[str, bytes]) -> None: ...

class KlController:
    """The β bookkeeping of ε-DPO: per-pair β from steps, cycle sums, the β update."""

    def __init__(self, beta: float, epsilon: float) -> None: ...
    @property
    def beta(self) -> float: ...
    @property
    def epsilon(self) -> float: ...
    def betas_for(self, steps: npt.NDArray[np.int8]) -> npt.NDArray[np.float64]: ...
    def record(
        self, pair_ids: npt.NDArray[np.uint64], steps: npt.NDArray[np.int8]
    ) -> npt.NDArray[np.float64]: ...
    def local_sums(self) -> tuple[int, int]: ...
    def apply_update(self, global_sum: int, global_count: int) -> float:
        """β ← β / (1 + ε·sum/count); returns the new β. Raises :class:`ConfigError` naming both
        values, β unchanged, when ``count < 0`` or ``|sum| > count`` (a corrupted all-reduce)."""
    def beta_history(self) -> npt.NDArray[np.float64]: ...
    def ledger(self) -> dict[str, npt.NDArray[Any]]: ...
    def state_dict(self) -> dict[str, bytes]: ...
    def load_state_dict(self, state: dict[str, bytes]) -> None: ...
