"""What a run record's reader and writer share, without lightning: the format tag and the process start time.

:mod:`entrotrain.dashboards.run_record` (the writer, a Lightning logger) and :mod:`entrotrain.dashboards.run_reader`
(what ``entrotrain report`` reads with) both import these from here, so ``entrotrain report`` never imports lightning.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RECORD_FORMAT", "process_start_time"]

#: Written into ``meta.json`` so that a reader can tell a run record from any other folder.
RECORD_FORMAT = "entrotrain-run-record/1"


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``), ``None`` where it cannot be read.

    Stored beside the pid in ``meta.json`` so that a reader can tell the writer from a later process that reuses
    its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime, after "pid (comm)"
    except (OSError, IndexError, ValueError):
        return None
