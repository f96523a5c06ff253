"""What a run-record reader made of a record, as a dict comparable with ``==`` (the dashboards tests that compare a
cached, followed or partial read with a full read of the same bytes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from entrotrain.dashboards.run_reader import RunData, RunFollower, load_run
from entrotrain.errors import EntrotrainError


def seen(run: RunData) -> dict:
    """Scalars (NaN as -999 so that == holds), media entries, events, warnings, notes, meta, status, last step."""
    return {
        "scalars": {k: (s.tolist(), np.where(np.isnan(v), -999.0, v).tolist()) for k, (s, v) in run.scalars.items()},
        "media": {k: [(m.step, m.offset, m.shape, m.dtype, m.kind, m.meta, m.path) for m in items]
                  for k, items in run.media.items()},
        "events": run.events, "warnings": run.warnings, "notes": run.notes, "meta": run.meta,
        "status": run.decided_status, "last_step": run.last_step,
    }


def read_seen(run: Path) -> dict | str:
    """:func:`seen` of ``load_run(run)``, or the text of its EntrotrainError."""
    try:
        return seen(load_run(run, require_monitors=False))
    except EntrotrainError as err:
        return str(err)


def follow_seen(follower: RunFollower) -> dict | str:
    """:func:`seen` of the follower's next read, or the text of its EntrotrainError."""
    try:
        return seen(follower.read(require_monitors=False))
    except EntrotrainError as err:
        return str(err)
