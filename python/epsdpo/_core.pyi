"""Type stubs of the Rust extension ``epsdpo._core`` (kept true by tests/test_stubs.py)."""

from collections.abc import Sequence
from os import PathLike
from typing import Any, Literal, TypedDict

import numpy as np
import numpy.typing as npt

__version__: str

IntArray = npt.NDArray[np.integer[Any]]
Layout = Literal["padded", "packed", "shared_prompt"]
LAYOUTS: tuple[Layout, ...]
"""Every batch layout's name, in the order users see them: the one list the config and the CLI read."""

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

class Batch(TypedDict):
    """What a :class:`Collator` call returns: ``B`` pairs as ``2B`` sequences (sequence ``b`` is
    pair ``b``'s chosen answer, ``B + b`` its rejected one) in one layout. ``rows`` is ``2B``
    (padded), the number of packed rows (packed) or ``B`` (shared_prompt); ``T`` counts the
    scored (completion) tokens, ``S`` the skipped pairs, ``I`` the pairs dropped as identical.
    ``[rows, cols]`` arrays are row-major.

    A type checker's view only: at run time the batch is a plain ``dict``, and ``Batch`` is
    not importable from ``epsdpo._core``."""

    input_ids: npt.NDArray[np.int64]
    """``[rows, cols]`` token ids; ``pad_token_id`` on padding."""
    attention_mask: npt.NDArray[np.int64]
    """``[rows, cols]`` 1 on tokens, 0 on padding."""
    position_ids: npt.NDArray[np.int64]
    """``[rows, cols]`` position in the sequence (shared_prompt's rejected answer goes on from the prompt); 0 on padding."""
    completion_mask: npt.NDArray[np.bool_]
    """``[rows, cols]`` True on the completion tokens that are scored."""
    sequence_index: npt.NDArray[np.int32]
    """``[rows, cols]`` sequence of each token, -1 on padding (shared_prompt's prompt tokens: the chosen one)."""
    segment_ids: npt.NDArray[np.int32]
    """``[rows, cols]`` attention segment, -1 on padding: i sees j iff same row and segment, j <= i, branch rule."""
    branch_ids: npt.NDArray[np.int8]
    """``[rows, cols]`` 0 shared, 1 chosen, 2 rejected: i sees j only if ``branch[j] in (0, branch[i])``."""
    cu_seqlens: npt.NDArray[np.int32]
    """``[runs + 1]`` flat starts of the runs of equal segment, padding too, then ``rows * cols``: flash-attn varlen."""
    max_seqlen: int
    """Length of the longest run in ``cu_seqlens``."""
    logit_index: npt.NDArray[np.int64]
    """``[T]`` flat ``row * cols + col`` position whose logits predict each scored token."""
    target_ids: npt.NDArray[np.int64]
    """``[T]`` each scored token."""
    target_sequence: npt.NDArray[np.int64]
    """``[T]`` the sequence each scored token belongs to."""
    num_sequences: int
    """``2B``."""
    pair_indices: npt.NDArray[np.int64]
    """``[B]`` store indices of the batch's pairs, in sequence order (skipped pairs left out)."""
    pair_ids: npt.NDArray[np.uint64]
    """``[B]`` ids of those pairs."""
    skipped: npt.NDArray[np.int64]
    """``[S]`` store indices dropped as truncation emptied a completion (``skip_empty=True``)."""
    identical: npt.NDArray[np.int64]
    """``[I]`` store indices dropped (always) as their chosen and rejected are the same tokens after
    truncation: such a pair has nothing to learn."""
    num_truncated: int
    """How many of the ``B`` pairs lost tokens to truncation."""
    sequence_lengths: npt.NDArray[np.int32]
    """``[2B]`` prompt + completion length of each sequence after truncation."""
    layout: Layout
    """The layout that produced the batch."""
    branched: bool
    """Its rows hold a prompt with two answer branches (``branch_ids`` != 0): see ``Collator.branched``."""
    right_padded: bool
    """Each row is one sequence then padding: see ``Collator.right_padded``."""

class Truncation:
    """How pairs are cut to length, as one frozen value checked when built: ``max_length`` (prompt +
    one completion), ``max_prompt_length``, ``max_completion_length`` (each None for no limit) and
    which end of a long prompt survives. ``TrainConfig.truncation`` builds a run's."""

    def __init__(
        self,
        *,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        max_completion_length: int | None = None,
        prompt_truncation_mode: Literal["keep_end", "keep_start"] = "keep_end",
    ) -> None: ...
    @property
    def max_length(self) -> int | None: ...
    @property
    def max_prompt_length(self) -> int | None: ...
    @property
    def max_completion_length(self) -> int | None: ...
    @property
    def prompt_truncation_mode(self) -> Literal["keep_end", "keep_start"]: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

class Collator:
    """Turns pair indices into one batch layout: a dict of numpy arrays."""

    def __init__(
        self,
        layout: Layout = "padded",
        *,
        truncation: Truncation | None = None,
        pad_token_id: int = 0,
        pad_to_multiple_of: int = 1,
        capacity: int | None = None,
        skip_empty: bool = False,
    ) -> None: ...
    def __call__(self, store: PreferenceStore, indices: IntArray | Sequence[int]) -> Batch: ...
    def truncated_lengths(self, store: PreferenceStore) -> dict[str, Any]: ...
    @property
    def layout(self) -> Layout: ...
    @property
    def branched(self) -> bool:
        """Rows hold a prompt with two answer branches, the rejected one blind to the chosen one:
        neither a causal mask nor varlen boundaries express that."""
    @property
    def right_padded(self) -> bool:
        """Every row is one sequence then padding: causal attention over whole rows is exact."""
    @property
    def packs_rows(self) -> bool:
        """Rows hold several sequences end to end: a token budget counts tokens, not padded cells."""
    @property
    def truncation(self) -> Truncation: ...
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

    def __init__(self, beta: float, epsilon: float, beta_min: float | None = None) -> None: ...
    @property
    def beta(self) -> float: ...
    @property
    def epsilon(self) -> float: ...
    @property
    def beta_min(self) -> float | None: ...
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
