"""`_core.pyi` must describe the extension as it is: same names, same parameters, and the keys and
types of the batch dict the collator returns."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import numpy as np
import pytest

import epsdpo._core as core

STUB = Path(core.__file__).with_name("_core.pyi")
if not STUB.exists():  # an installed wheel keeps the stub beside the package sources
    STUB = Path(__file__).parents[1] / "python" / "epsdpo" / "_core.pyi"


def is_typeddict(node):
    return any(isinstance(b, ast.Name) and b.id == "TypedDict" for b in node.bases)


def stub_classes():
    """The stub's classes, less its TypedDicts: those describe dicts that the extension returns
    and exist for type checkers only."""
    tree = ast.parse(STUB.read_text())
    classes = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not is_typeddict(node):
            methods = {}
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    args = item.args
                    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                    methods[item.name] = [n for n in names if n != "self"]
            classes[node.name] = methods
    return classes


def runtime_params(obj):
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [p for p in sig.parameters if p not in ("self", "$self", "cls")]


def test_every_public_class_is_stubbed_and_every_stub_exists():
    stubs = stub_classes()
    public = {n for n, v in vars(core).items() if isinstance(v, type) and not n.startswith("_")}
    assert public == set(stubs)


def test_methods_and_parameters_agree():
    for name, methods in stub_classes().items():
        cls = getattr(core, name)
        runtime = {n for n in dir(cls) if not n.startswith("_") and n != "pair_index"}
        if issubclass(cls, BaseException):
            continue
        assert runtime == {m for m in methods if not m.startswith("_")}, name
        for method, params in methods.items():
            if method.startswith("__") and method != "__init__":
                continue  # slot wrappers carry CPython's generic signatures
            target = cls if method == "__init__" else getattr(cls, method)
            if isinstance(target, property) or type(target).__name__ == "getset_descriptor":
                continue
            got = runtime_params(target)
            if got is not None:
                assert got == params, f"{name}.{method}: runtime {got} vs stub {params}"


def stub_typeddict(name):
    """``{key: (annotation source, one-line docstring)}`` of a TypedDict of the stub."""
    tree = ast.parse(STUB.read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name and is_typeddict(n)]
    keys, body = {}, node.body
    for item, after in zip(body, body[1:] + [None]):
        if isinstance(item, ast.AnnAssign):
            doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
            keys[item.target.id] = (ast.unparse(item.annotation), doc)
    return keys


def stub_literal(alias):
    """The values of a module-level ``Alias = Literal[...]`` of the stub."""
    tree = ast.parse(STUB.read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == alias]
    values = node.value.slice
    return {e.value for e in (values.elts if isinstance(values, ast.Tuple) else [values])}


def test_the_layout_list_is_the_stubs_and_the_configs():
    """One list of layout names: the extension's, which the stub's Literal and the config's spell out."""
    import typing

    from epsdpo.config import Layout

    assert list(core.LAYOUTS) == [*typing.get_args(Layout)] and set(core.LAYOUTS) == stub_literal("Layout")


def test_collator_returns_the_batch_typeddict():
    tree = ast.parse(STUB.read_text())
    (collator,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Collator"]
    (call,) = [f for f in collator.body if isinstance(f, ast.FunctionDef) and f.name == "__call__"]
    assert ast.unparse(call.returns) == "Batch"


@pytest.mark.parametrize("layout", sorted(stub_literal("Layout")))
def test_collated_batch_matches_the_batch_typeddict(layout):
    store = core.PreferenceStore(vocab_size=100)
    store.add_pair([1, 2, 3], [4, 5], [6])
    store.add_pair([7, 8], [9, 10, 11, 12], [13, 14])
    store.add_pair([1] * 8, [2], [3])  # its prompt fills max_length: skipped
    store.add_pair([5, 6], list(range(20, 30)), [7])  # chosen answer truncated
    store.add_pair([5, 6], [7, 8], [7, 8])  # chosen identical to rejected: dropped
    collator = core.Collator(layout, truncation=core.Truncation(max_length=8), skip_empty=True, pad_to_multiple_of=4)
    batch = collator(store, [0, 2, 4, 3, 1])
    # no key is trivially empty
    assert len(batch["skipped"]) == 1 and len(batch["identical"]) == 1 and batch["num_truncated"] == 1

    stub = stub_typeddict("Batch")
    assert set(batch) == set(stub)
    sizes = {}  # each shape symbol of the docstrings (rows, cols, B, 2B, T, ...) has one size
    for key, (annotation, doc) in stub.items():
        value = batch[key]
        if m := re.fullmatch(r"npt\.NDArray\[np\.(\w+)\]", annotation):
            assert isinstance(value, np.ndarray), key
            assert value.dtype == np.dtype(getattr(np, m[1])), f"{key}: {value.dtype} vs stub {annotation}"
            shape = re.match(r"``\[([^\]]+)\]``", doc)
            assert shape, f"{key}: the stub's docstring does not start with its shape"
            symbols = [d.strip() for d in shape[1].split(",")]
            assert value.ndim == len(symbols), f"{key}: shape {value.shape} vs stub {symbols}"
            for symbol, n in zip(symbols, value.shape):
                assert sizes.setdefault(symbol, n) == n, f"{key}: {symbol} = {n}, elsewhere {sizes[symbol]}"
        elif annotation == "int":
            assert type(value) is int, f"{key}: {type(value).__name__} vs stub int"
        elif annotation == "bool":
            assert value is getattr(collator, key), f"{key}: the batch says {value}, its collator otherwise"
        elif annotation == "Layout":
            assert value == layout and value in stub_literal("Layout"), key
        else:
            raise AssertionError(f"{key}: the test does not know the stub type {annotation}")
        assert doc, f"{key}: undocumented in the stub"
    assert sizes["B"] == 3 and sizes["2B"] == batch["num_sequences"] == 6
    assert sizes["rows"] * sizes["cols"] == batch["cu_seqlens"][-1]
