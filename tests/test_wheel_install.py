"""The wheel ships the recipes and config fragments, and an installed wheel (not the checkout) runs a recipe by name
from an empty folder: `pip wheel` of a copy of the sources, `pip install --no-deps --target`, then the installed
console script with PYTHONPATH pointing at the install only (no network: no build isolation, no index)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy_sources(dst: Path) -> None:
    """What the build needs, without touching the shared checkout (an in-tree build writes build/ and egg-info)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    for name in ("entrotrain", "recipes", "configs"):  # entrotrain/recipes, entrotrain/configs: links kept as links
        shutil.copytree(ROOT / name, dst / name, symlinks=True, ignore=ignore)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    if not _has_pip():
        pytest.skip("pip is not available in this interpreter")
    base = tmp_path_factory.mktemp("wheel")
    src, dist, target = base / "src", base / "dist", base / "site"
    src.mkdir()
    _copy_sources(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), str(src)],
                   check=True, capture_output=True, timeout=180)
    (wheel,) = dist.glob("entrotrain-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=180)
    return target


def _has_pip() -> bool:
    return subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0


def test_wheel_holds_every_recipe_and_fragment(installed):
    (wheel,) = installed.parent.joinpath("dist").glob("entrotrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("recipes", "configs"):
        for path in (ROOT / folder).rglob("*.yaml"):
            assert f"entrotrain/{folder}/{path.relative_to(ROOT / folder).as_posix()}" in names


def test_installed_wheel_runs_a_recipe_by_name_from_an_empty_folder(installed, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "WANDB_"))}
    env.update(PYTHONPATH=str(installed), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    code = (
        "import sys, entrotrain\n"
        f"assert entrotrain.__file__.startswith({str(installed)!r}), entrotrain.__file__\n"
        "from entrotrain.cli import main\n"
        "cli = main(sys.argv[1:])\n"
        "print('STEPS', cli.trainer.global_step)\n"
    )
    args = ["fit", "--recipe", "attention_collapse", "--trainer.max_steps=1", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", "--trainer.default_root_dir=runs"]
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "STEPS 1" in done.stdout
    records = list((work / "runs" / "records").iterdir())
    assert len(records) == 1 and records[0].name.startswith("attention_collapse-")
    recipe = (records[0] / "meta.json").read_text()
    assert str(installed / "entrotrain" / "recipes" / "attention_collapse.yaml") in recipe  # the wheel's own file
