"""`_core.pyi` must describe the extension as it is: same names, same parameters."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import epsdpo._core as core

STUB = Path(core.__file__).with_name("_core.pyi")
if not STUB.exists():  # an installed wheel keeps the stub beside the package sources
    STUB = Path(__file__).parents[1] / "python" / "epsdpo" / "_core.pyi"


def stub_classes():
    tree = ast.parse(STUB.read_text())
    classes = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
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
