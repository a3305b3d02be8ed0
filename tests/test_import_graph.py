"""No import circle: neither among the modules of `python/epsdpo` nor among those of `rust/core/src`.

A circle makes a module impossible to read, test or change alone, and in Python it also makes the
import order matter. The graphs are built from the sources, so a new edge is seen without running it:
Python's from each module's top-level imports (those under `if TYPE_CHECKING:` too: a type-only
import still ties the two modules' designs together; imports inside functions are deferred work and
left out), Rust's from every `crate::` path.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "python" / "epsdpo"
RUST_CORE = ROOT / "rust" / "core" / "src"

def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The module's own import statements, those nested in module-level `if` / `try` included."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            pending += [*node.body, *node.orelse, *getattr(node, "finalbody", []),
                        *(s for h in getattr(node, "handlers", []) for s in h.body)]
    return found


def python_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in top_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # a relative import: up from this module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from pkg import sub` needs the submodule pkg.sub when there is one (pkg itself is
                # imported first whatever a submodule does, so that is no edge); any other name, pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def rust_graph() -> dict[str, set[str]]:
    files = {p.stem: p for p in RUST_CORE.glob("*.rs") if p.stem != "lib"}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        # `#[cfg(test)]` modules depend on their parent through `super::`, which is no edge
        used = set(re.findall(r"\bcrate::(\w+)", path.read_text()))
        graph[name] |= {u for u in used if u in files and u != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph` as the list of its nodes (first repeated at the end), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graphs_see_the_imports_that_exist():
    """A parser that saw nothing would find no circle: the edges it must see, it sees."""
    python, rust = python_graph(), rust_graph()
    assert "epsdpo.config" in python["epsdpo.feed"] and "epsdpo._core" not in python  # an extension, no source
    assert "epsdpo.data.stats" in python["epsdpo.data.ingest"] and "epsdpo.data.cache" in python["epsdpo.data.ingest"]
    assert {"truncate", "limits", "store", "error"} <= rust["collate"]


def test_no_import_circle_in_the_python_package():
    cycle = find_cycle(python_graph())
    assert cycle is None, "import circle: " + " → ".join(cycle)


def test_no_module_imports_the_trainer_back():
    """Checkpoints, the run identity and the model card take named parts of the run (RunParts,
    RunFacts); only the package's own export list names the Trainer."""
    graph = python_graph()
    assert sorted(name for name, targets in graph.items() if "epsdpo.trainer" in targets) == ["epsdpo"]


def test_the_settings_methods_read_are_config_fields():
    """MethodSettings stands in for TrainConfig in the methods (which the config imports): every
    setting it lists is a field of the config, of the same type."""
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


def test_no_module_circle_in_the_rust_core():
    cycle = find_cycle(rust_graph())
    assert cycle is None, "module circle in rust/core/src: " + " → ".join(cycle)
