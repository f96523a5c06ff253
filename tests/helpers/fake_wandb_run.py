"""A stand-in for ``wandb.run`` in tests: records what is logged, alerted and declared."""

from __future__ import annotations


class FakeRun:
    """Set as ``wandb.run`` (``monkeypatch.setattr(wandb, "run", FakeRun())``); ``logged`` holds each ``log`` call's
    data, ``alerts`` each ``alert``'s keyword arguments, ``defined`` each ``define_metric`` as ``(name, kwargs)``."""

    def __init__(self) -> None:
        self.logged: list[dict] = []
        self.alerts: list[dict] = []
        self.defined: list[tuple[str, dict]] = []

    def log(self, data: dict, **kwargs) -> None:
        self.logged.append(data)

    def alert(self, **kwargs) -> None:
        self.alerts.append(kwargs)

    def define_metric(self, name: str, **kwargs) -> None:
        self.defined.append((name, kwargs))

    def finish(self, **kwargs) -> None:  # the suite's autouse fixture finishes the active run
        pass
