"""How a `TrainConfig` field says what it accepts, once: the rule lives in the field's metadata.

A field declared with `number(...)`, `integer(...)` or `one_of(...)` carries its rule (a `Range` or a
`OneOf`) beside its metadata (`rule_of(field)`). Its help text, which `epsdpo train --help` and
docs/reference/config.md show, ends with the rule's own words, and `check_allowed` refuses a value
outside it with those same words: help and check cannot disagree. Checks that involve several fields
stay in config.py as named functions. A refusal is a `ConfigFieldError` naming the field, the value
and what is allowed, so a caller (the CLI) reads the key from the error instead of from its text.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from epsdpo._core import ConfigError
from epsdpo.safe_yaml import MAX_SHOWN, shown

class ConfigFieldError(ConfigError):
    """One config field holds a value it does not accept. `field` names it, `value` is what it held,
    `allowed` says what it accepts (the words after "must be"). A `ValueError`, and one of
    `epsdpo.ConfigError` with the Rust core's refusals of an out-of-range setting."""

    def __init__(self, field: str, value: Any, allowed: str, *, reason: str | None = None) -> None:
        self.field, self.value, self.allowed, self.reason = field, value, allowed, reason
        # `reason`: what the line says instead of "must be <allowed>", where why it is refused says more
        super().__init__(f"{field}={shown(value)} is invalid: {reason or 'must be ' + allowed}")

    def __reduce__(self) -> tuple[Any, ...]:  # copied and pickled with its parts, not only its text
        return _rebuilt, (type(self), self.field, self.value, self.allowed, self.reason)


def _rebuilt(kind: type[ConfigFieldError], field: str, value: Any, allowed: str, reason: str | None) -> ConfigFieldError:
    return kind(field, value, allowed, reason=reason)


class UnknownConfigKeysError(ConfigError):
    """A YAML, a mapping or the command line holds keys that are no setting. `keys`: those (the first
    ten), `known`: every key accepted; `summary` is the line without the list of known keys."""

    def __init__(self, keys: list[Any], known: list[str]) -> None:
        import difflib

        self.keys, self.known = keys, sorted(known)
        close = {k: difflib.get_close_matches(str(k)[:MAX_SHOWN], known, n=1) for k in keys}
        hints = ", ".join(f"{m[0]!r}" + (f" for {shown(k)}" if len(keys) > 1 else "") for k, m in close.items() if m)
        self.summary = f"unknown config keys {shown(keys)}" + (f" (did you mean {hints}?)" if hints else "")
        super().__init__(f"{self.summary}; known keys: {self.known}")


def _spelled(bound: float) -> str:
    """A bound as the message writes it: a large power of two as 2**k, a float in its short form."""
    if isinstance(bound, int) and bound >= 2**16 and bound & (bound - 1) == 0:
        return f"2**{bound.bit_length() - 1}"
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


@dataclass(frozen=True)
class Range:
    """The numbers a field accepts: from `low` to `high`, either end left out when None and excluded
    when `*_open`. `unset`: one more value accepted outside the range, meaning "not set" (max_steps'
    -1). `note`: why, appended to the words (e.g. " (0 disables clipping)")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    whole: bool = False  # an integer field: said "an integer ..."
    optional: bool = False  # None is accepted too
    unset: int | None = None
    noun: str | None = None  # what the words call a value, when "an integer" says too little
    note: str = ""

    def holds(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.unset is not None and value == self.unset:
            return True
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def words(self) -> str:
        noun = self.noun or ("an integer" if self.whole else "a finite number")
        if self.low is not None and self.high is not None:
            span = (f"{'(' if self.low_open else '['}{_spelled(self.low)}, "
                    f"{_spelled(self.high)}{')' if self.high_open else ']'}")
            text = f"{noun} in {span}" if self.whole or self.noun else f"in {span}"
        elif self.low is not None:
            text = f"{noun} {'>' if self.low_open else '>='} {_spelled(self.low)}"
        elif self.high is not None:
            text = f"{'below' if self.high_open else 'at most'} {_spelled(self.high)}"
        else:
            text = noun
        if self.unset is not None:
            text = f"{self.unset} (unset) or {text}"
        return ("None or " if self.optional else "") + text + self.note


@dataclass(frozen=True)
class OneOf:
    """The values a field accepts, listed; `note`: why (e.g. ": AdamW is the one optimizer implemented")."""

    values: tuple[Any, ...]
    note: str = ""

    def holds(self, value: Any) -> bool:
        return any(value == v and type(value) is type(v) or _same_number(value, v) for v in self.values)

    def words(self) -> str:
        return " or ".join(map(str, self.values)) + self.note


def _same_number(value: Any, choice: Any) -> bool:
    """0 and 0.0 are the same choice of a float field; True is not 1."""
    numbers = (int, float)
    return (isinstance(value, numbers) and isinstance(choice, numbers) and not isinstance(value, bool)
            and not isinstance(choice, bool) and value == choice)


Rule = Range | OneOf


class DeclaredField(dataclasses.Field):
    """A dataclass field that carries its rule. The rule is not a `metadata` key: transformers'
    HfArgumentParser (and TRL's TrlParser, which a TRL script parses `DPOConfig` with) passes every
    metadata key to argparse, which refuses any it does not know."""

    __slots__ = ("rule",)


def declared(default: Any, help: str, rule: Rule) -> Any:
    """A dataclass field whose rule is `rule`: its help ends with what the rule allows."""
    plain = field(default=default, metadata={"help": f"{help} Must be {rule.words()}."})
    ruled = DeclaredField.__new__(DeclaredField)
    for name in dataclasses.Field.__slots__:  # `field`'s own making of the field, whatever its Python version
        setattr(ruled, name, getattr(plain, name))
    ruled.rule = rule
    return ruled


def number(default: float | None, help: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, optional: bool | None = None, note: str = "") -> Any:
    """A float field in a range; None is accepted too when `optional` (unsaid: when the default is None)."""
    optional = default is None if optional is None else optional
    return declared(default, help, Range(low, high, low_open, high_open, optional=optional, note=note))


def integer(default: int | None, help: str, *, low: int | None = 1, high: int | None = None,
            high_open: bool = False, optional: bool | None = None, unset: int | None = None,
            noun: str | None = None, note: str = "") -> Any:
    """An integer field, by default >= 1; None is accepted too when `optional` (unsaid: when the
    default is None)."""
    optional = default is None if optional is None else optional
    return declared(default, help, Range(low, high, high_open=high_open, whole=True, optional=optional,
                                         unset=unset, noun=noun, note=note))


def one_of(default: Any, help: str, *values: Any, note: str = "") -> Any:
    """A field that accepts only the values listed."""
    return declared(default, help, OneOf(values, note))


def rule_of(f: dataclasses.Field) -> Rule | None:
    return getattr(f, "rule", None)


def check_allowed(config: Any) -> None:
    """Every declared rule of `config`'s fields, in declaration order; the first value outside its
    rule is a ConfigFieldError in the rule's words."""
    for f in dataclasses.fields(config):
        rule, value = rule_of(f), getattr(config, f.name)
        if rule is not None and not rule.holds(value):
            raise ConfigFieldError(f.name, value, rule.words())
