"""The HF Trainer / loop integrations print a monitor's fit-end table by the Lightning monitor's own rule
(``HookedMonitor._printed_summary``: ``print_summary`` and ``_has_summary``), not a copy of it per driver."""

from __future__ import annotations

import pytest

from entrotrain.callbacks import (
    AttentionEntropyMonitor,
    PredictionEntropyMonitor,
    RepresentationEntropyMonitor,
    RouterEntropyMonitor,
    SigmaReparamMonitor,
)
from entrotrain.integrations._monitor_session import make_driver


@pytest.mark.parametrize(
    "make", [AttentionEntropyMonitor, RepresentationEntropyMonitor, RouterEntropyMonitor, PredictionEntropyMonitor]
)
def test_a_driver_prints_what_the_lightning_monitor_prints(make, monkeypatch):
    monitor = make(print_summary=True)
    driver = make_driver(monitor, 0, "EntropyMonitors", "in a training loop")
    assert driver.summary() is None  # nothing logged yet
    monkeypatch.setattr(monitor, "_has_summary", lambda: True)
    monkeypatch.setattr(monitor, "summary_table", lambda: "the table")
    assert driver.summary() == "the table" == monitor._printed_summary()
    monitor.print_summary = False
    assert driver.summary() is None


def test_sigma_reparam_prints_no_table():
    assert make_driver(SigmaReparamMonitor(), 0, "EntropyMonitors", "in a training loop").summary() is None
