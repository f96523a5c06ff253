"""Findings of the session-26 hunt in the TRL adapters (EntrotrainGRPOTrainer, EntrotrainRLOOTrainer and their shared
PolicyStatsTrainerMixin). Each test failed before its fix.

TRL is an optional extra: the whole module is skipped without it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

from trl import GRPOTrainer, RLOOTrainer  # noqa: E402

from entrotrain.errors import EntrotrainError  # noqa: E402
from entrotrain.integrations.trl import EntrotrainGRPOTrainer  # noqa: E402
from entrotrain.integrations.trl_rloo import EntrotrainRLOOTrainer  # noqa: E402


class _TRLBuilt(Exception):
    """Raised in place of TRL's trainer __init__: reaching it means TRL started building (model, refs, data)."""


@pytest.mark.parametrize("cls, base", [(EntrotrainGRPOTrainer, GRPOTrainer), (EntrotrainRLOOTrainer, RLOOTrainer)])
@pytest.mark.parametrize(
    "kw, name",
    [
        ({"window_align": "sideways"}, "window_align"),
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
        ({"entropy_length_corr": "yes"}, "entropy_length_corr"),
        ({"stats_prefix": 3}, "stats_prefix"),
    ],
)
def test_bad_statistic_arguments_are_refused_before_trl_builds_anything(monkeypatch, cls, base, kw, name):
    """The mixin promises "a bad statistic argument (naming it), before TRL builds anything". window, window_align
    and entropy_length_corr were checked by the monitor only after TRL's __init__ (model, reference model, data
    loaders built first); stats_prefix was not checked at all (a TypeError at the first logging step)."""

    def refuse(self, *args, **kwargs):
        raise _TRLBuilt

    monkeypatch.setattr(base, "__init__", refuse)
    with pytest.raises(EntrotrainError, match=name):
        cls(model=None, **kw)
