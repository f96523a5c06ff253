"""PEP 562 lazy package attributes: a package's public names (and submodules) are imported on first access.

Shared by :mod:`entrotrain` (so ``import entrotrain`` and the CLI's light subcommands never load torch) and
:mod:`entrotrain.dashboards` (so ``entrotrain report`` never loads lightning).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Collection
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    package: str, namespace: dict[str, Any], names: dict[str, str], submodules: Collection[str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of a lazy package.

    Args:
        package: the package's ``__name__``.
        namespace: its ``globals()``: a loaded value is cached there, so each name is imported once.
        names: public name → the module that defines it.
        submodules: the submodule names reachable as attributes; ``None``: any submodule that exists (not ``_private``).
    """

    def is_submodule(name: str) -> bool:
        if submodules is not None:
            return name in submodules
        return not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
        elif is_submodule(name):
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names, *(submodules or ())})

    return __getattr__, __dir__
