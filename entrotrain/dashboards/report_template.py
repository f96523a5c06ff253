"""The HTML of ``entrotrain report``: one self-contained page (inline CSS, no scripts, no network), images by relative
path. Only markup lives here; what goes into the page is decided in :mod:`entrotrain.dashboards.report`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable

__all__ = ["CSS", "details", "esc", "fmt", "page", "table"]

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0; color: #1d2430;
       background: #f6f7f9; line-height: 1.45; }
main { max-width: 1200px; margin: 0 auto; padding: 20px 28px 60px; }
h1 { font-size: 1.6em; margin: 0.4em 0 0.1em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 2px solid #d7dce3; padding-bottom: 4px; }
h3 { font-size: 1.0em; margin: 1.2em 0 0.3em; }
.sub { color: #5a6575; margin: 0 0 1em; }
.desc { white-space: pre-wrap; background: #fff; border-left: 4px solid #6b8cce; padding: 8px 12px; margin: 12px 0;
        font-size: 0.93em; }
.warn { background: #fff4d6; border: 1px solid #e6c15a; padding: 8px 12px; border-radius: 6px; margin: 10px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; }
.card { background: #fff; border: 1px solid #dde2ea; border-radius: 8px; padding: 8px 12px; min-width: 170px; }
.card .label { font-size: 0.78em; color: #5a6575; }
.card .key { font-size: 0.7em; color: #8a93a3; font-family: monospace; }
.card .value { font-size: 1.15em; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .run { font-size: 0.72em; color: #5a6575; }
.findings li { margin: 3px 0; }
table { border-collapse: collapse; background: #fff; font-size: 0.85em; margin: 8px 0; }
th, td { border: 1px solid #dde2ea; padding: 3px 8px; text-align: left; font-variant-numeric: tabular-nums; }
th { background: #eef1f5; }
td.num { text-align: right; font-family: monospace; }
figure { background: #fff; border: 1px solid #dde2ea; border-radius: 8px; margin: 14px 0; padding: 10px; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { font-size: 0.85em; color: #4a5463; margin-top: 6px; }
details { margin: 10px 0; }
summary { cursor: pointer; font-weight: 600; }
pre { background: #fff; border: 1px solid #dde2ea; padding: 10px; overflow-x: auto; font-size: 0.8em; }
.status-finished { color: #1a7f37; } .status-running { color: #9a6700; } .status-failed, .status-killed,
.status-interrupted, .status-stale, .status-unknown { color: #cf222e; }
nav a { margin-right: 12px; font-size: 0.9em; }
"""


def esc(text: object) -> str:
    """HTML-escaped ``str(text)``."""
    return html.escape(str(text), quote=True)


def fmt(value: float | None, digits: int = 4) -> str:
    """A number as the report prints it everywhere (``"–"`` for missing, ``nan`` kept visible)."""
    if value is None:
        return "–"
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.{digits}g}"


def table(header: Iterable[str], rows: Iterable[Iterable[str]], raw: bool = False, cls: str = "") -> str:
    """An HTML table; cells are escaped unless ``raw`` (then they are trusted HTML)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            text = cell if raw else esc(cell)
            num = not raw and _looks_numeric(cell)
            cells.append(f'<td class="num">{text}</td>' if num else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _looks_numeric(cell: str) -> bool:
    try:
        float(cell)
    except (TypeError, ValueError):
        return cell == "–"
    return True


def details(summary: str, inner_html: str, open_: bool = False) -> str:
    """A collapsible ``<details>`` block."""
    return f"<details{' open' if open_ else ''}><summary>{esc(summary)}</summary>{inner_html}</details>"


def page(title: str, body: str) -> str:
    """The whole document."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body><main>{body}</main></body></html>\n"
    )
