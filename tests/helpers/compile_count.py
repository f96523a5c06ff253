"""Counting what ``torch.compile`` compiles: a backend that records every graph dynamo hands it, and graph breaks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch._dynamo
from torch._dynamo.utils import counters


class CountingBackend:
    """A ``torch.compile`` backend that keeps each graph's code and runs the graph as traced (no inductor: cheap on
    CPU). ``len(backend.graphs)`` is the number of compiles (recompiles included)."""

    def __init__(self) -> None:
        self.graphs: list[str] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(gm.code)
        return gm.forward

    @property
    def compiles(self) -> int:
        return len(self.graphs)


@contextmanager
def fresh_dynamo() -> Iterator[None]:
    """Dynamo's caches and counters emptied before and after (compiled code of one test never serves another)."""
    torch._dynamo.reset()
    counters.clear()
    try:
        yield
    finally:
        torch._dynamo.reset()
        counters.clear()


def graph_breaks() -> dict[str, int]:
    """Graph breaks dynamo counted since the last :func:`fresh_dynamo` (reason -> count)."""
    return dict(counters["graph_break"])
