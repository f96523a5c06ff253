"""Reading an ``entrotrain report`` page back in tests: image sources, headline cards and visible text.

Shared by every report test (tests/dashboards/test_report*.py).
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

__all__ = ["ReportPage", "parse_page"]


class ReportPage(HTMLParser):
    """``images`` (``src`` of every ``<img>``), ``cards`` ((key, run) → first / last / text) and ``text``."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cards: dict[tuple[str, str], dict[str, str]] = {}
        self.text: list[str] = []
        self._card: tuple[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a["src"])
        if "data-key" in a:
            self._card = (a["data-key"], a["data-run"])
            self.cards[self._card] = {"first": a["data-first"], "last": a["data-last"], "text": ""}

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self._card = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._card is not None:
            self.cards[self._card]["text"] += data

    @property
    def joined(self) -> str:
        """The visible text, pieces joined by spaces."""
        return " ".join(self.text)


def parse_page(index: Path) -> ReportPage:
    page = ReportPage()
    page.feed(Path(index).read_text())
    return page
