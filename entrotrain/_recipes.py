"""The bundled recipes and config fragments: where they are, how to call a recipe by name, how a fragment is found.

**Where.** The repository keeps ``recipes/`` and ``configs/`` at its root; the package ships both as package data
(``entrotrain/recipes`` and ``entrotrain/configs`` are links to them in the checkout, real folders in a wheel), so
``entrotrain fit --recipe attention_collapse`` works from any folder, editable checkout or installed wheel.

**Fragments.** A recipe names its fragments relative to its own file (``logger: ../configs/logger/wandb.yaml``), which
is how jsonargparse resolves them. A fragment path of that form (``configs/...`` after any number of ``../``) that
does not exist relative to the file naming it is looked up in the bundled ``configs/`` by the part after
``configs/``, so a recipe copied to any folder still finds ``../configs/logger/wandb.yaml``; a fragment of your own
beside the copy (``../configs/...`` relative to it) wins over the bundled one. A fragment found in neither place is a
:class:`FragmentNotFoundError` naming the file, both places looked in and the fragments there are.

Nothing here imports torch or lightning (``entrotrain recipes`` stays fast); jsonargparse is imported only when
:func:`register_fragment_loader` runs.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from entrotrain.errors import EntrotrainError

__all__ = [
    "FRAGMENT_LOADER_MODE",
    "FragmentNotFoundError",
    "RecipeNotFoundError",
    "bundled_dir",
    "find_recipe",
    "recipe_paths",
    "register_fragment_loader",
    "resolve_fragment",
]

#: The jsonargparse parser mode whose loader resolves fragment paths (the YAML loader plus :func:`resolve_fragment`).
FRAGMENT_LOADER_MODE = "entrotrain_yaml"

_PACKAGE = Path(__file__).resolve().parent
_SUFFIXES = (".yaml", ".yml", ".json")


class RecipeNotFoundError(EntrotrainError):
    """``--recipe NAME`` names no bundled recipe."""


class FragmentNotFoundError(EntrotrainError):
    """A config names a ``configs/...`` fragment that exists neither beside it nor in the bundled ``configs/``."""


def bundled_dir(kind: Literal["recipes", "configs"]) -> Path | None:
    """The folder of the bundled recipes or configs: ``entrotrain/<kind>`` (a wheel; a link in the checkout), else
    ``<repository>/<kind>`` (a checkout whose links were not materialised); ``None`` when neither exists."""
    for candidate in (_PACKAGE / kind, _PACKAGE.parent / kind):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def recipe_paths() -> list[Path]:
    """The bundled recipe files, sorted by name (empty when none are shipped)."""
    folder = bundled_dir("recipes")
    return sorted(folder.glob("*.yaml")) if folder is not None else []


def find_recipe(name: str) -> Path:
    """The bundled recipe called ``name`` (``attention_collapse`` or ``attention_collapse.yaml``).

    Raises :class:`RecipeNotFoundError` naming the closest names and the fix."""
    paths = {p.stem: p for p in recipe_paths()}
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if stem in paths:
        return paths[stem]
    if not paths:
        raise RecipeNotFoundError(
            f"--recipe {name}: this installation ships no recipes (no entrotrain/recipes folder). Reinstall "
            "entrotrain from a wheel or the repository, or give a recipe file with --config PATH."
        )
    close = difflib.get_close_matches(stem, list(paths), n=3)
    hint = f"Did you mean {', '.join(close)}? " if close else ""
    if "/" in name or os.sep in name:
        hint += f"A recipe file is given with --config {name}. "
    raise RecipeNotFoundError(
        f"--recipe {name}: no bundled recipe of that name. {hint}Recipes: {', '.join(paths)} "
        "(`entrotrain recipes` describes them)."
    )


def _fragment_tail(value: str) -> PurePosixPath | None:
    """``logger/wandb.yaml`` for ``../configs/logger/wandb.yaml`` or ``configs/logger/wandb.yaml``; ``None`` for a
    string that is not a relative ``configs/...`` config path."""
    if "\n" in value or not value.endswith(_SUFFIXES) or value.startswith(("/", "~")) or "://" in value:
        return None
    parts = PurePosixPath(value.replace("\\", "/")).parts
    rest = list(parts)
    while rest and rest[0] in ("..", "."):
        rest.pop(0)
    if len(rest) < 2 or rest[0] != "configs":
        return None
    return PurePosixPath(*rest[1:])


def resolve_fragment(value: str, base: Path | str) -> str:
    """The path jsonargparse should read for a fragment ``value`` named in a config file in folder ``base``.

    ``value`` itself when it is not a ``configs/...`` path or exists relative to ``base``; else the bundled fragment
    with the same path after ``configs/``. Raises :class:`FragmentNotFoundError` when neither exists."""
    tail = _fragment_tail(value)
    if tail is None or (Path(base) / value).exists():
        return value
    bundled = bundled_dir("configs")
    if bundled is not None and (bundled / tail).is_file():
        return str(bundled / tail)
    available = sorted(str(p.relative_to(bundled)) for p in bundled.rglob("*.yaml")) if bundled is not None else []
    close = difflib.get_close_matches(str(tail), available, n=2)
    hint = f" Did you mean configs/{close[0]}?" if close else ""
    raise FragmentNotFoundError(
        f"fragment {value!r} named in a config file in folder {base} was not found: not at {Path(base, value).resolve()} nor "
        f"in the bundled configs ({bundled}).{hint} Bundled fragments: "
        f"{', '.join(available) or 'none'}. Fix the path, or copy your fragment to {Path(base, value).resolve()}."
    )


def _resolve_nested(value: Any, base: Path) -> Any:
    """``value`` with every string nested in a dict or list passed through :func:`resolve_fragment`."""
    if isinstance(value, dict):
        return {k: _resolve_nested(v, base) if isinstance(v, (dict, list)) else _resolve_leaf(v, base)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_nested(v, base) if isinstance(v, (dict, list)) else _resolve_leaf(v, base) for v in value]
    return value


def _resolve_leaf(value: Any, base: Path) -> Any:
    return resolve_fragment(value, base) if isinstance(value, str) else value


def fragment_loader(yaml_load: Callable[[str], Any]) -> Callable[[str], Any]:
    """A jsonargparse loader: ``yaml_load`` and then :func:`resolve_fragment` on every string nested in the result.

    jsonargparse loads a config file with the current directory set to the file's folder (that is how it resolves
    relative paths), so the folder a fragment path is relative to is the current directory."""

    def load(text: str) -> Any:
        value = yaml_load(text)
        if isinstance(value, (dict, list)):
            return _resolve_nested(value, Path.cwd())
        return value

    return load


def register_fragment_loader() -> str:
    """Register :data:`FRAGMENT_LOADER_MODE` with jsonargparse (idempotent); returns the mode to pass as
    ``parser_mode``."""
    import jsonargparse
    import yaml

    jsonargparse.set_loader(FRAGMENT_LOADER_MODE, fragment_loader(jsonargparse.get_loader("yaml")), (yaml.YAMLError,))
    return FRAGMENT_LOADER_MODE
