"""Batch tokenization with exactly the ids of the Rust fast tokenizer, faster.

:class:`BatchEncoder` returns, for many texts, the ids ``backend.encode(text,
add_special_tokens=False)`` would. For byte-level BPE tokenizers (GPT-2, SmolLM, Llama-3, Qwen,
…) it takes a faster route for Latin-script text, the bulk of most preference data:

1. split the text on added tokens (``<|im_start|>``, …) — the fast tokenizer does this first too,
   and tokenizes the pieces in between independently;
2. split each piece with the pre-tokenizer's regex, rewritten with Python's ``re`` for the
   characters the route accepts (U+0000–U+024F and most of General Punctuation, whose letter,
   digit and white-space classes are spelled out below and have not changed since Unicode 5);
3. look every pre-token up in a dict of pre-token → ids, running the tokenizer's own BPE model
   only on pre-tokens seen for the first time.

The Rust pipeline spends most of its time building an ``Encoding`` (strings, offsets, masks) per
token; natural text repeats its words, so the dict answers almost every lookup.

Everything else goes through the Rust tokenizer: pieces with other characters (CJK, emoji, …;
the rest of the conversation still takes the route), and every text of a tokenizer whose
normalizer, added tokens (whitespace stripping), BPE settings (dropout, prefixes) or pre-tokenizer
the route does not reproduce. On top of that, each call re-encodes a sample of its texts with the
Rust tokenizer and compares; a difference switches the route off for good, with a warning, and
redoes the call.
"""

from __future__ import annotations

import json
import re
import warnings
from itertools import chain
from typing import Any

import numpy as np

__all__ = ["BatchEncoder", "route_pattern"]

# Re-check the first text of every call, and one in this many, against the Rust tokenizer.
VERIFY_EVERY = 200
# Most pre-tokens the route remembers. Natural text repeats a few thousand words, but its long tail
# (numbers, names, typos) is new on every row: unbounded, the dict grew with the dataset (~200 bytes
# a pre-token, as much as the row's tokens). Emptied when full, it relearns the common words in a batch.
MAX_CACHED_PIECES = 1 << 17

# Character classes over the accepted characters (tests check them against unicodedata and Rust).
_LETTER = "A-Za-z\xaa\xb5\xba\xc0-\xd6\xd8-\xf6\xf8-\u024f"  # \p{L}
_NUMBER = "0-9\xb2\xb3\xb9\xbc-\xbe"  # \p{N}
_SPACE = "\t\n\x0b\x0c\r \x85\xa0"  # \s: Unicode White_Space (not \x1c-\x1f, unlike str.isspace)
# Characters the route accepts; a piece with any other goes to Rust.
_OUTSIDE = re.compile("[^\x00-\u024f\u2010-\u2027\u2030-\u205e]")
# Normalizers that leave ASCII unchanged (non-ASCII then needs no normalizer at all).
_ASCII_IDENTITY_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}
# The GPT-2 pattern of the ByteLevel pre-tokenizer (use_regex=True), as the Rust crate has it.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map, used by the ByteLevel pre-tokenizer."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def route_pattern(pattern: str) -> str | None:
    """Rewrite an Oniguruma pre-tokenizer regex for the route's characters, or None if it uses
    a construct without a sure meaning there."""
    outside = {
        "p{L}": f"[{_LETTER}]", "P{L}": f"[^{_LETTER}]", "p{N}": f"[{_NUMBER}]", "P{N}": f"[^{_NUMBER}]",
        "s": f"[{_SPACE}]", "S": f"[^{_SPACE}]",
    }  # fmt: skip
    inside = {"p{L}": _LETTER, "p{N}": _NUMBER, "s": _SPACE}
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            rest = pattern[i + 1 :]
            table = inside if in_class else outside
            key = next((k for k in table if rest.startswith(k)), None)
            if key is not None:
                out.append(table[key])
                i += 1 + len(key)
                continue
            if not rest or rest[0].isalpha() and rest[0] not in "rntfv":
                return None  # \p{..}, \w, \d, \b, … : Unicode-aware escapes we do not translate
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if ch == "[" and not in_class:
            if pattern.startswith("[[", i) or pattern.startswith(":", i + 1):
                return None  # nested or POSIX classes
            in_class = True
            out.append(ch)
            i += 1
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):  # a literal ] first in a class
                out.append("\\]")
                i += 1
            continue
        if ch == "]" and in_class:
            in_class = False
        elif ch == "(" and not in_class and pattern.startswith("(?", i):
            if not re.match(r"\(\?(?:[imsx]*:|=|!|<=|<!)", pattern[i:]):
                return None  # atomic, named or conditional groups
        out.append(ch)
        i += 1
    return "".join(out)


class _PieceCache(dict):  # type: ignore[type-arg]
    """pre-token → ids; a miss runs the BPE model once (hits stay a C-level dict lookup)."""

    def __init__(self, bpe: Any) -> None:
        super().__init__()
        self.bpe = bpe

    def __missing__(self, piece: str) -> tuple[int, ...]:
        ids = self[piece] = self.bpe(piece)
        return ids


class _Route:
    """The dict-of-pre-tokens route for one byte-level BPE tokenizer."""

    def __init__(self, backend: Any, pattern: str, non_ascii: bool) -> None:
        self.model = backend.model
        self.pre = re.compile(pattern)
        # GPT-2's pattern matches every character (its last alternatives take any run of spaces or
        # of other characters), so only other patterns need their cover checked.
        self.covers_all = pattern == route_pattern(GPT2_PATTERN)
        # Without a normalizer, non-ASCII pieces of the accepted characters can take the route too.
        self.non_ascii = non_ascii
        self.added = {tok.content: tid for tid, tok in backend.get_added_tokens_decoder().items()}
        contents = sorted(self.added, key=len, reverse=True)  # longest first = leftmost-longest, like the tokenizer
        self.split = re.compile("(" + "|".join(map(re.escape, contents)) + ")") if contents else None
        byte_map = _bytes_to_unicode()
        self.byte_map = {b: byte_map[b] for b in range(256)}
        self.cache = _PieceCache(self._bpe)

    @classmethod
    def build(cls, backend: Any) -> _Route | None:
        """The route if this tokenizer is one it reproduces exactly, else None. Reads the
        components' own settings rather than parsing the whole tokenizer JSON (megabytes)."""
        if getattr(backend, "encode_special_tokens", False):
            return None  # added tokens are not split out
        try:
            norm = json.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else None
            pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else None
        except Exception:
            return None
        norms = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else ([norm] if norm else [])
        if any(n.get("type") not in _ASCII_IDENTITY_NORMALIZERS for n in norms):
            return None
        model = backend.model
        if type(model).__name__ != "BPE" or getattr(model, "dropout", None) not in (None, 0.0):
            return None
        if getattr(model, "continuing_subword_prefix", None) or getattr(model, "end_of_word_suffix", None):
            return None
        if any(tok.lstrip or tok.rstrip or tok.single_word for tok in backend.get_added_tokens_decoder().values()):
            return None
        pattern = cls._pattern(pre)
        if pattern is None:
            return None
        try:
            return cls(backend, pattern, non_ascii=not norms)
        except re.error:
            return None

    @staticmethod
    def _pattern(pre: dict[str, Any] | None) -> str | None:
        if not pre:
            return None
        if pre.get("type") == "ByteLevel":
            if pre.get("add_prefix_space") or not pre.get("use_regex", True):
                return None
            return route_pattern(GPT2_PATTERN)
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
        if len(steps) != 2:
            return None
        split, byte_level = steps
        if (
            split.get("type") != "Split"
            or split.get("behavior") != "Isolated"
            or split.get("invert")
            or "Regex" not in (split.get("pattern") or {})
            or byte_level.get("type") != "ByteLevel"
            or byte_level.get("add_prefix_space")
            or byte_level.get("use_regex", True)
        ):
            return None
        return route_pattern(split["pattern"]["Regex"])

    def _bpe(self, piece: str) -> tuple[int, ...]:
        mapped = piece.encode("utf-8").decode("latin-1").translate(self.byte_map)
        return tuple(t.id for t in self.model.tokenize(mapped))

    def _accepts(self, part: str) -> bool:
        return part.isascii() or (self.non_ascii and _OUTSIDE.search(part) is None)

    def encode(self, text: str, pending: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text``, except for the pieces between added tokens the route does not take:
        those are appended to ``pending`` for the Rust tokenizer and returned as ``(position in
        ids, index in pending)`` holes. Rust tokenizes those pieces independently too, so
        filling the holes in later gives the same ids."""
        out: list[int] = []
        holes: list[tuple[int, int]] = []
        cache = self.cache
        parts = self.split.split(text) if self.split is not None else [text]
        for k, part in enumerate(parts):
            if k & 1:  # a captured added token
                out.append(self.added[part])
                continue
            if not part:
                continue
            if self._accepts(part):
                words = self.pre.findall(part)
                if self.covers_all or sum(map(len, words)) == len(part):
                    out.extend(chain.from_iterable(map(cache.__getitem__, words)))
                    continue
                # a Split pattern leaving gaps ("Isolated" keeps them as pieces): leave it to Rust
            holes.append((len(out), len(pending)))
            pending.append(part)
        return out, holes


def _fill(ids: list[int], holes: list[tuple[int, int]], filled: list[list[int]]) -> list[int]:
    out: list[int] = []
    at = 0
    for pos, k in holes:
        out.extend(ids[at:pos])
        out.extend(filled[k])
        at = pos
    out.extend(ids[at:])
    return out


class BatchEncoder:
    """Ids of many texts, as the tokenizer's Rust backend gives them without special tokens,
    plus what the ingestion needs to know about the tokenizer (BOS/EOS, added tokens)."""

    def __init__(self, tokenizer: Any, fast_route: bool = True) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; load it with "
                "AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        backend = tokenizer.backend_tokenizer
        if backend.truncation is not None or backend.padding is not None:
            # transformers leaves these set on the backend between calls; never cut our encodings
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        self.backend = backend
        self._rust = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self.route = _Route.build(backend) if fast_route else None
        self.bos_id: int | None = tokenizer.bos_token_id
        self.eos_id: int | None = tokenizer.eos_token_id
        # Does the tokenizer put BOS in front by itself (as `tokenizer(text)` would)?
        probe = backend.encode("a", add_special_tokens=True).ids
        self.adds_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        added = backend.get_added_tokens_decoder()
        self.vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
        self.added_mask = np.zeros(self.vocab_size, dtype=bool)
        self.added_content: dict[int, str] = {}
        for tid, tok in added.items():
            self.added_mask[tid] = True
            self.added_content[tid] = tok.content

    def rust(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._rust(texts, add_special_tokens=False)] if texts else []

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.route is None:
            return self.rust(texts)
        if len(self.route.cache) > MAX_CACHED_PIECES:
            self.route.cache.clear()
        pending: list[str] = []
        planned = [self.route.encode(t, pending) for t in texts]
        filled = self.rust(pending)
        out = [_fill(ids, holes, filled) if holes else ids for ids, holes in planned]
        sample = range(0, len(texts), VERIFY_EVERY)
        if len(sample) and self.rust([texts[k] for k in sample]) != [out[k] for k in sample]:
            warnings.warn(
                "the fast tokenization route disagreed with the Rust tokenizer on this tokenizer; "
                "using the Rust tokenizer for everything",
                RuntimeWarning,
                stacklevel=2,
            )
            self.route = None
            return self.rust(texts)
        return out
