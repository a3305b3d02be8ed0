"""No import circle in python/epsdpo: the graph of module-level imports, type-only ones (under
`if TYPE_CHECKING:`) included, read from the sources with `ast`, has no cycle. A circle that only
type checkers follow still ties two modules into one unit (neither can be read or changed alone),
which is what checkpoints and the model card were with the Trainer."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "epsdpo"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The imports a module runs when loaded, or names for type checkers: module level, inside
    `if TYPE_CHECKING:` and inside try blocks; not those inside functions (run on call)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            found += _top_imports(node.body)
        elif isinstance(node, ast.Try):
            found += _top_imports(node.body + [s for h in node.handlers for s in h.body] + node.orelse)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the epsdpo modules it imports (a name imported from a package counts as its module
    when it is one, else as the package)."""
    modules = _module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in _top_imports(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules}
                continue
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets |= {full} if full in modules else {base} if base in modules else set()
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_type_only_circle():
    """The oracle itself: a graph with a circle through a type-only import is reported, one without is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from epsdpo.trainer import Trainer\n"
    assert [n.module for n in _top_imports(ast.parse(source).body)] == ["typing", "epsdpo.trainer"]


def test_the_graph_sees_the_modules_and_their_imports():
    graph = import_graph()
    assert {"epsdpo.trainer", "epsdpo.config", "epsdpo.methods.base", "epsdpo.data"} <= set(graph)
    assert {"epsdpo.config", "epsdpo.run_checkpoints", "epsdpo.model_card"} <= graph["epsdpo.trainer"]


def test_no_module_imports_the_trainer_back():
    """Checkpoints, the run identity and the model card take named parts (RunParts, RunFacts); only
    the package's own export list names the Trainer."""
    graph = import_graph()
    assert sorted(name for name, targets in graph.items() if "epsdpo.trainer" in targets) == ["epsdpo"]


def test_the_settings_methods_read_are_config_fields():
    """MethodSettings stands in for TrainConfig in the methods: every setting it lists is a field of
    the config, with the same type."""
    import dataclasses
    import typing

    from epsdpo.config import TrainConfig
    from epsdpo.methods.settings import MethodSettings

    fields = typing.get_type_hints(TrainConfig)
    listed = {name: typing.get_type_hints(value.fget)["return"]
              for name, value in vars(MethodSettings).items() if isinstance(value, property)}
    assert len(listed) >= 12 and set(listed) <= {f.name for f in dataclasses.fields(TrainConfig)}
    for name, kind in listed.items():
        assert kind == fields[name] or (name == "method" and typing.get_origin(fields[name]) is typing.Literal), name


def test_python_epsdpo_has_no_import_circle():
    assert cycles(import_graph()) == []
