"""The README's runnable examples: the fenced ``python`` block between ``<!-- NAME -->`` and ``<!-- /NAME -->``."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(name: str) -> str:
    """The code of the first ```` ```python ```` block between ``<!-- name -->`` and ``<!-- /name -->`` in README.md;
    fails (AssertionError) when the README lost the markers or the block between them."""
    section = re.search(rf"<!-- {re.escape(name)} -->(.*?)<!-- /{re.escape(name)} -->", README.read_text(), re.S)
    assert section is not None, f"README.md lost its <!-- {name} --> block"
    code = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert code is not None, f"the {name} block in README.md holds no ```python fenced code"
    return code.group(1)
