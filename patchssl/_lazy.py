"""Names of a package imported on first use (PEP 562), so that importing it stays light."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package whose names live in its submodules.

    Args:
        namespace: The package's ``globals()``; a name is cached there once imported.
        exports: Public name -> the module that defines it.

    Returns:
        ``(__getattr__, __dir__)`` to assign at the package's top level.
    """
    package = namespace["__name__"]

    def getattr_(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *exports})

    return getattr_, dir_
