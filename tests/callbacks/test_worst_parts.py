"""A guard's firing names the heads (or layers) its aggregate key fell on, from the values published with it."""

from __future__ import annotations

import warnings

import torch

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks._worst_parts import worst_parts
from entrotrain.integrations.loop import EntropyMonitors

P = "entropy/attn_norm"
HEADS = {f"{P}/L2/H3": 0.012, f"{P}/L1/H1": 0.02, f"{P}/L3/H0": 0.031, f"{P}/L1/H2": 0.048, f"{P}/L0/H0": 0.9,
         f"{P}/L1/mean": 0.001, f"{P}/min": 0.012, "entropy/attn/L2/H3": 0.001}


def test_the_heads_on_the_bad_side_worst_first() -> None:
    assert worst_parts(f"{P}/min", HEADS, 0.05, below=True) == (
        " (4 heads below: L2/H3 = 0.012, L1/H1 = 0.02, L3/H0 = 0.031, +1 more)")
    assert worst_parts(f"{P}/min", {f"{P}/L2/H3": 0.012, f"{P}/L0/H0": float("nan")}, 0.05, below=True) == (
        " (1 head below: L2/H3 = 0.012)")
    assert worst_parts(f"{P}/max", {f"{P}/L0/H1": 0.97, f"{P}/L0/H0": 0.99}, 0.95, below=False) == (
        " (2 heads above: L0/H0 = 0.99, L0/H1 = 0.97)")


def test_layers_when_no_head_was_published_and_nothing_for_other_keys() -> None:
    layers = {"rank/L0": 3.0, "rank/L1": 1.5, "rank/min": 1.5}
    assert worst_parts("rank/min", layers, 2.0, below=True) == " (1 layer below: L1 = 1.5)"
    assert worst_parts("entropy/attn/collapse_frac", HEADS, 0.5, below=False) == ""  # not an aggregate of parts
    assert worst_parts(f"{P}/min", None, 0.05, below=True) == ""
    assert worst_parts(f"{P}/min", {f"{P}/L0/H0": 0.9}, 0.05, below=True) == ""


def test_a_loop_guard_names_the_heads() -> None:
    model = torch.nn.Linear(2, 2)
    guard = EntropyCollapseGuard(f"{P}/min", threshold=0.05, keep_last_good=False)
    monitors = EntropyMonitors(guards=[guard], print_summary=False)
    with warnings.catch_warnings(record=True) as caught, monitors.watch(model):
        warnings.simplefilter("always")
        for step, values in enumerate(({f"{P}/min": 0.5, f"{P}/L0/H0": 0.5}, HEADS)):
            with monitors.step(step):
                monitors.observe(**values)
    fired = [str(w.message) for w in caught if "EntropyCollapseGuard at step 1" in str(w.message)]
    assert fired and "= 0.012 fell below 0.05 (4 heads below: L2/H3 = 0.012," in fired[0], fired
