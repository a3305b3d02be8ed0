"""Reading a config YAML with bounded cost, and showing its values in one short line.

`yaml.safe_load` executes nothing, but it is not bounded: aliases make a few hundred bytes stand
for billions of values (the "billion laughs": each level repeats the previous one's alias nine
times), or one long string repeated thousands of times, which cost nothing while shared but
gigabytes as soon as anything walks or prints them, and a deeply nested document overflows Python's
recursion limit. `load_config_yaml` measures, while the document is composed, how large it would be
with every alias expanded (a value counts 1 plus its characters) and how deep it nests, and refuses
either over its bound before any Python object is built. `shown` caps what an error message echoes
of a value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# A config holds a few dozen keys; these bounds are far above any real one and far below harm.
MAX_EXPANDED = 4 << 20  # size of the document, every alias counted as a full copy of what it names
MAX_DEPTH = 64  # nesting of mappings and lists
MAX_BYTES = 1 << 20  # the file itself
MAX_SHOWN = 200  # characters of a value an error message repeats


class ConfigFileError(ValueError):
    """A config file is too large, nests too deeply or expands too far; names the file."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that measures, per composed node, its size with aliases expanded, and its depth."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._weights: dict[int, int] = {}  # id(node) → its size, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigFileError(f"nested more than {MAX_DEPTH} levels deep (line {mark.line + 1})")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if id(node) not in self._weights:  # an alias returns a node already weighed
            own = len(node.value) if isinstance(node, yaml.ScalarNode) else 0
            self._weights[id(node)] = 1 + own + sum(self._weight(child) for child in _children(node))
        # An alias counts in full every time it is used: that is what walking or printing the loaded value costs.
        if self._weights[id(node)] > MAX_EXPANDED:
            raise ConfigFileError(f"expands to more than {MAX_EXPANDED:,} characters once its aliases are expanded "
                                  f"(line {node.start_mark.line + 1}): a config is a few kilobytes")
        return node

    def _weight(self, node: Any) -> int:
        return self._weights.get(id(node), 1)


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_config_yaml(path: str | Path) -> Any:
    """The YAML document at `path`, as `yaml.safe_load` reads it, refused (ConfigFileError naming the
    file) when it is over MAX_BYTES, nests deeper than MAX_DEPTH or expands to more than MAX_EXPANDED
    characters. Invalid YAML raises yaml.YAMLError, as safe_load does."""
    path = Path(path)
    with open(path, "rb") as handle:
        raw = handle.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise ConfigFileError(f"{path}: over {MAX_BYTES:,} bytes, too large for a config file")
    loader = _BoundedLoader(raw)
    try:
        return loader.get_single_data()
    except ConfigFileError as error:
        raise ConfigFileError(f"{path}: {error}") from None
    except RecursionError:  # a bound above should come first; never let the interpreter's limit show
        raise ConfigFileError(f"{path}: nested too deeply to read") from None
    except ValueError as error:  # int() of a number over sys.get_int_max_str_digits() digits
        raise ConfigFileError(f"{path}: a value cannot be read ({shown(str(error))})") from None
    finally:
        loader.dispose()


def shown(value: Any) -> str:
    """`repr(value)` for an error message, cut to MAX_SHOWN characters. A shared (aliased) structure's
    repr can be gigabytes; `reprlib` stops descending long before that."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 4, MAX_SHOWN, MAX_SHOWN
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 12
    try:
        text = short.repr(value)
    except ValueError:  # an int over sys.get_int_max_str_digits() digits has no decimal repr
        text = (f"<an integer of {value.bit_length()} bits>" if isinstance(value, int)
                else f"<a {type(value).__name__} holding an integer too long to show>")
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."
