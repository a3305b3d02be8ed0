"""Finding string comparisons of registered names (methods, layouts) in source code, for the tests
that keep those comparisons inside their registry and the config."""

from __future__ import annotations

import ast
from collections.abc import Collection


def compared_names(source: str, names: Collection[str], attribute: str, *, bare_name: bool = False) -> list[int]:
    """Lines of `x == "dpo"`-like comparisons (==, !=, in, not in, ...) of one of `names`, and of any
    comparison of an attribute called `attribute` (also a bare variable of that name with `bare_name`)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        constants = [o for o in operands if isinstance(o, ast.Constant)]
        constants += [e for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set)) for e in o.elts
                      if isinstance(e, ast.Constant)]
        named = any(isinstance(o, ast.Attribute) and o.attr == attribute
                    or bare_name and isinstance(o, ast.Name) and o.id == attribute for o in operands)
        if named or any(c.value in names for c in constants):
            lines.append(node.lineno)
    return lines
