"""``entrotrain fit ...`` from this script's own arguments, in a fresh interpreter: Lightning's DDP subprocess launcher
re-runs it once per extra rank (``tests/test_resume_fork_findings.py``, the 2-process fork)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    from entrotrain.cli import main

    main(sys.argv[1:])
