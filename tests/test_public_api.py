"""The public API: every exported name is documented, typed, and in the API reference."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import patchssl

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"
PUBLIC = sorted(name for name in patchssl.__all__ if name != "__version__")


def test_all_names_exist():
    missing = [name for name in patchssl.__all__ if not hasattr(patchssl, name)]
    assert not missing


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_docstring(name):
    obj = getattr(patchssl, name)
    doc = inspect.getdoc(obj)
    assert doc and len(doc) > 40, f"{name} needs a docstring"


@pytest.mark.parametrize("name", PUBLIC)
def test_public_functions_are_typed(name):
    obj = getattr(patchssl, name)
    functions = []
    if inspect.isfunction(obj):
        functions.append(obj)
    elif inspect.isclass(obj):
        for attr, member in vars(obj).items():
            if inspect.isfunction(member) and (not attr.startswith("_") or attr == "__init__"):
                functions.append(member)
    for fn in functions:
        sig = inspect.signature(fn)
        untyped = [
            p.name
            for p in sig.parameters.values()
            if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty
        ]
        assert not untyped, f"{name}.{fn.__name__}: parameters without type hints: {untyped}"
        if fn.__name__ != "__init__":
            assert sig.return_annotation is not inspect.Signature.empty, (
                f"{name}.{fn.__name__} has no return annotation"
            )


def test_api_reference_covers_every_public_name():
    documented = set(re.findall(r"^::: patchssl\.(\w+)\s*$", API_PAGE.read_text(), re.M))
    assert set(PUBLIC) - documented == set(), "add these to docs/api.md"
    assert documented - set(PUBLIC) == set(), "docs/api.md names something not exported"
