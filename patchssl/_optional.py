"""Optional dependencies behind one cached check, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

__all__ = ["is_available", "require"]


@cache
def is_available(module: str) -> bool:
    """Whether ``module`` can be imported (cached)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(module: str, *, extra: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` or raise an ImportError that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        what = feature or module
        raise ImportError(
            f"{what} needs the optional dependency '{module}', which is not installed. "
            f'Install it with: pip install "patchssl[{extra}]"'
        ) from err
