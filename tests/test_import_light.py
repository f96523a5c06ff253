"""``import entrotrain`` is light: no torch, lightning, wandb, transformers, trl, verl or triton until a name is used.

That is what lets ``entrotrain recipes`` / ``--help`` start at once and the ``entrotrain`` command set
``OMP_WAIT_POLICY`` before torch loads its OpenMP runtime (``entrotrain._cpu_threads``)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "lightning", "wandb", "transformers", "trl", "verl", "triton")


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300).stdout


def test_package_and_cli_import_nothing_heavy() -> None:
    out = _run(f"import sys, entrotrain, entrotrain.cli; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert out.strip() == "[]"


def test_public_names_load_on_first_access() -> None:
    out = _run(
        "import sys, entrotrain\n"
        "f = entrotrain.attention_entropy_stats; t = entrotrain.AttentionTap\n"
        "from entrotrain.functional import attention_entropy_stats\n"
        "from entrotrain.taps import AttentionTap\n"
        "assert f is attention_entropy_stats and t is AttentionTap\n"
        "assert entrotrain.functional is sys.modules['entrotrain.functional']\n"
        "assert set(entrotrain.__all__) <= set(dir(entrotrain))\n"
        "print([m for m in ('transformers', 'trl', 'verl', 'triton') if m in sys.modules])\n"
        "from entrotrain.callbacks import AttentionEntropyMonitor\n"  # lightning itself imports transformers/triton
        "assert entrotrain.AttentionEntropyMonitor is AttentionEntropyMonitor"
    )
    assert out.strip() == "[]"


def test_unknown_attribute_is_an_attribute_error() -> None:
    import entrotrain
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        entrotrain.nope  # noqa: B018
