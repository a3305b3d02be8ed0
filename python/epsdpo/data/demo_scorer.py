"""Programmatic gold reward for the bundled demo dataset: checkable instructions.

An instruction spec is a list of constraints, each a dict with a ``type`` and its parameters,
e.g. ``[{"type": "max_words", "n": 30}, {"type": "include_words", "words": ["river"]}]``.
:func:`score` gives the mean over the constraints of a per-constraint score in [0, 1]. Count-type
constraints (word limits, bullet and sentence counts, keyword frequency) earn partial credit in
proportion to how close the answer comes, so two imperfect answers can still be ranked; the rest
are pass/fail. :func:`describe` renders the spec as the instruction text put in the prompt, and
:func:`sample_instructions` draws a compatible spec (seeded), so data generation and evaluation
share one definition.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "CONSTRAINT_TYPES",
    "check",
    "count_bullets",
    "count_sentences",
    "count_words",
    "describe",
    "follows_all",
    "instruction_text",
    "parse_instructions",
    "sample_instructions",
    "score",
    "score_details",
]

Constraint = dict[str, Any]

# A word: letters/digits, with inner apostrophes or hyphens ("it's", "well-known" count once).
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.MULTILINE)
# A sentence ends at . ! or ? followed by whitespace or the end of the text.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_TITLE = re.compile(r"<<[^<>\n]+>>")


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def count_bullets(text: str) -> int:
    """Lines that start with ``-``, ``*``, ``•`` or ``1.`` / ``1)`` followed by text."""
    return len(_BULLET.findall(text))


def count_sentences(text: str) -> int:
    """Pieces that contain a word, split after ``.``, ``!`` or ``?`` (a trailing piece without
    end punctuation counts too: a cut-off final sentence is still a sentence)."""
    return sum(1 for piece in _SENTENCE_END.split(text) if _WORD.search(piece))


def _words_lower(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _closeness(got: int, want: int) -> float:
    """1 at the target, falling linearly to 0 at a miss of ``want`` (or more)."""
    return max(0.0, 1.0 - abs(got - want) / max(want, 1))


def _max_words(text: str, c: Constraint) -> float:
    n, w = c["n"], count_words(text)
    return 1.0 if w <= n else max(0.0, 1.0 - (w - n) / n)


def _min_words(text: str, c: Constraint) -> float:
    return min(1.0, count_words(text) / c["n"])


def _include_words(text: str, c: Constraint) -> float:
    words = set(_words_lower(text))
    return sum(w.lower() in words for w in c["words"]) / len(c["words"])


def _exclude_words(text: str, c: Constraint) -> float:
    words = set(_words_lower(text))
    return sum(w.lower() not in words for w in c["words"]) / len(c["words"])


def _keyword_frequency(text: str, c: Constraint) -> float:
    return min(1.0, _words_lower(text).count(c["word"].lower()) / c["n"])


def _bullets(text: str, c: Constraint) -> float:
    return _closeness(count_bullets(text), c["n"])


def _sentences(text: str, c: Constraint) -> float:
    return _closeness(count_sentences(text), c["n"])


def _lowercase(text: str, c: Constraint) -> float:
    return float(any(ch.isalpha() for ch in text) and text == text.lower())


def _no_commas(text: str, c: Constraint) -> float:
    return float("," not in text and "，" not in text)


def _starts_with(text: str, c: Constraint) -> float:
    first = _words_lower(text[:200])
    return float(bool(first) and first[0] == c["word"].lower())


def _ends_with(text: str, c: Constraint) -> float:
    tail = text.rstrip().rstrip(".!?\"'").rstrip().lower()
    return float(tail.endswith(c["phrase"].lower()))


def _title(text: str, c: Constraint) -> float:
    return float(bool(_TITLE.search(text)))


_CHECKS: dict[str, Callable[[str, Constraint], float]] = {
    "max_words": _max_words,
    "min_words": _min_words,
    "include_words": _include_words,
    "exclude_words": _exclude_words,
    "keyword_frequency": _keyword_frequency,
    "bullets": _bullets,
    "sentences": _sentences,
    "lowercase": _lowercase,
    "no_commas": _no_commas,
    "starts_with": _starts_with,
    "ends_with": _ends_with,
    "title": _title,
}
CONSTRAINT_TYPES: tuple[str, ...] = tuple(_CHECKS)


def _quote_list(words: Sequence[str], joiner: str) -> str:
    q = [f'"{w}"' for w in words]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + f" {joiner} " + q[-1]


def describe(c: Constraint) -> str:
    """The instruction sentence for one constraint."""
    t = c["type"]
    if t == "max_words":
        return f"Answer in at most {c['n']} words."
    if t == "min_words":
        return f"Use at least {c['n']} words."
    if t == "include_words":
        return f"Include the word{'s' if len(c['words']) > 1 else ''} {_quote_list(c['words'], 'and')}."
    if t == "exclude_words":
        return f"Do not use the word{'s' if len(c['words']) > 1 else ''} {_quote_list(c['words'], 'or')}."
    if t == "keyword_frequency":
        return f'Use the word "{c["word"]}" at least {c["n"]} times.'
    if t == "bullets":
        return f"Format the answer as exactly {c['n']} bullet points, each line starting with \"- \"."
    if t == "sentences":
        return f"Answer in exactly {c['n']} sentence{'s' if c['n'] > 1 else ''}."
    if t == "lowercase":
        return "Write your whole answer in lowercase letters, with no capital letters."
    if t == "no_commas":
        return "Do not use any commas."
    if t == "starts_with":
        return f'Start your answer with the word "{c["word"]}".'
    if t == "ends_with":
        return f'End your answer with the phrase "{c["phrase"]}".'
    if t == "title":
        return "Give your answer a title wrapped in double angular brackets, like <<my title>>."
    raise ValueError(f"unknown constraint type {t!r}; known: {', '.join(CONSTRAINT_TYPES)}")


def parse_instructions(instructions: str | Sequence[Constraint]) -> list[Constraint]:
    """Accept a spec as a list of dicts or its JSON text (as stored in the dataset)."""
    spec = json.loads(instructions) if isinstance(instructions, str) else list(instructions)
    for c in spec:
        if not isinstance(c, dict) or c.get("type") not in _CHECKS:
            raise ValueError(f"unknown constraint type in {c!r}; known types: {', '.join(CONSTRAINT_TYPES)}")
    return spec


def instruction_text(instructions: str | Sequence[Constraint]) -> str:
    return " ".join(describe(c) for c in parse_instructions(instructions))


def check(text: str, c: Constraint) -> float:
    """Score in [0, 1] of ``text`` against one constraint."""
    try:
        fn = _CHECKS[c["type"]]
    except KeyError:
        raise ValueError(f"unknown constraint type {c.get('type')!r}; known: {', '.join(CONSTRAINT_TYPES)}") from None
    return fn(text, c)


def score_details(text: str, instructions: str | Sequence[Constraint]) -> list[float]:
    return [check(text, c) for c in parse_instructions(instructions)]


def score(text: str, instructions: str | Sequence[Constraint]) -> float:
    """Mean constraint score in [0, 1]; 1 means every instruction is followed."""
    details = score_details(text, instructions)
    if not details:
        raise ValueError("an instruction spec needs at least one constraint")
    return sum(details) / len(details)


def follows_all(text: str, instructions: str | Sequence[Constraint]) -> bool:
    return all(s == 1.0 for s in score_details(text, instructions))


# Words for include/exclude/keyword constraints and openings/closings; plain, common words a small
# model can actually produce, so the constraints are attainable.
_WORDS = (
    "light water energy simple important people world time history nature future small quick "
    "careful friendly useful bright strong green river mountain city music story garden ocean"
).split()
_OPENERS = ("Yes", "Sure", "Well", "First", "Today", "Imagine", "Honestly", "Certainly")
_CLOSINGS = ("thank you", "that is all", "hope this helps", "the end", "good luck")

# Constraint types that cannot hold together (or make each other trivial).
_CLASHES = {
    frozenset({"bullets", "sentences"}),
    frozenset({"max_words", "min_words"}),
    frozenset({"include_words", "exclude_words"}),
    frozenset({"keyword_frequency", "exclude_words"}),
    frozenset({"starts_with", "lowercase"}),
    frozenset({"title", "lowercase"}),
    frozenset({"title", "starts_with"}),
    frozenset({"bullets", "starts_with"}),
    frozenset({"bullets", "ends_with"}),
}


def _draw(t: str, rng: random.Random) -> Constraint:
    if t == "max_words":
        return {"type": t, "n": rng.choice((10, 15, 20, 25, 30))}
    if t == "min_words":
        return {"type": t, "n": rng.choice((25, 30, 35, 40))}
    if t in ("include_words", "exclude_words"):
        return {"type": t, "words": sorted(rng.sample(_WORDS, rng.choice((1, 2))))}
    if t == "keyword_frequency":
        return {"type": t, "word": rng.choice(_WORDS), "n": rng.choice((2, 3))}
    if t == "bullets":
        return {"type": t, "n": rng.choice((2, 3, 4))}
    if t == "sentences":
        return {"type": t, "n": rng.choice((1, 2, 3))}
    if t == "starts_with":
        return {"type": t, "word": rng.choice(_OPENERS)}
    if t == "ends_with":
        return {"type": t, "phrase": rng.choice(_CLOSINGS)}
    return {"type": t}


def sample_instructions(rng: random.Random, k: int | None = None) -> list[Constraint]:
    """Draw ``k`` (default 1–3) mutually compatible constraints."""
    k = rng.choice((1, 2, 2, 3)) if k is None else k
    types = list(CONSTRAINT_TYPES)
    rng.shuffle(types)
    chosen: list[str] = []
    for t in types:
        if len(chosen) == k:
            break
        if all(frozenset({t, u}) not in _CLASHES for u in chosen):
            chosen.append(t)
    return [_draw(t, rng) for t in chosen]
