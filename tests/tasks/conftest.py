"""Fixtures shared by the task tests."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture
def no_network(monkeypatch):
    """Any socket ``connect`` during the test fails it: the bundled data sets load offline."""

    def guard(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", guard)
