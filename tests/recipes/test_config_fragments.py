"""Every reusable fragment under configs/ still fits the code it names (DESIGN §1: trainer, logger, monitor presets).

Recipes include some fragments (their smoke tests build them), but an overlay (``--config configs/trainer/gpu.yaml``,
``configs/grpo/gpu.yaml``) or a monitor preset no recipe lists (``configs/monitors/representation.yaml``) is read by
nothing in the suite: a renamed argument would break it unnoticed. Checked here without running anything: a
``class_path`` fragment builds with its ``init_args``; an overlay names only ``Trainer`` arguments and, for
``model`` / ``data``, arguments of the classes the recipes that it overlays name.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Trainer

ROOT = Path(__file__).resolve().parents[2]
FRAGMENTS = sorted((ROOT / "configs").rglob("*.yaml"))
#: Overlay → a recipe it is documented to go with (its model / data classes are the ones the overlay's keys must fit).
OVERLAID = {"grpo/gpu.yaml": "grpo_baseline.yaml"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _class(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _parameters(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {name for name, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}


def test_there_are_fragments():
    names = {str(p.relative_to(ROOT / "configs")) for p in FRAGMENTS}
    assert {"monitors/representation.yaml", "trainer/gpu.yaml", "logger/wandb.yaml"} <= names


@pytest.mark.parametrize("path", [p for p in FRAGMENTS if "class_path" in _load(p)], ids=lambda p: p.stem)
def test_class_fragment_builds(path):
    spec = _load(path)
    cls = _class(spec["class_path"])
    init_args = spec.get("init_args") or {}
    unknown = set(init_args) - _parameters(cls)
    assert not unknown, f"{path.name}: {cls.__name__} takes no {sorted(unknown)}"
    if not spec["class_path"].startswith("lightning.pytorch.loggers."):  # a logger would create its run folder
        cls(**init_args)


@pytest.mark.parametrize("path", [p for p in FRAGMENTS if "class_path" not in _load(p)], ids=lambda p: p.stem)
def test_overlay_names_only_existing_arguments(path):
    spec = _load(path)
    assert set(spec) <= {"trainer", "model", "data", "seed_everything"}, f"{path.name}: {sorted(spec)}"
    unknown = set(spec.get("trainer") or {}) - _parameters(Trainer)
    assert not unknown, f"{path.name}: Trainer takes no {sorted(unknown)}"
    rel = str(path.relative_to(ROOT / "configs"))
    if "model" in spec or "data" in spec:
        recipe = _load(ROOT / "recipes" / OVERLAID[rel])
        for part in ("model", "data"):
            args = (spec.get(part) or {}).get("init_args") or {}
            unknown = set(args) - _parameters(_class(recipe[part]["class_path"]))
            assert not unknown, f"{path.name}: {recipe[part]['class_path']} takes no {sorted(unknown)}"
