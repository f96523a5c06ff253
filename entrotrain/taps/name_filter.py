"""Choosing modules by name: ``include`` / ``exclude`` globs over dotted module names, shared by every tap.

Syntax (the names are those of ``model.named_modules()``, e.g. ``"model.layers.0.self_attn"``; ``.`` separates
*segments*):

==============  =====================================================================================================
``*``           any characters **within one segment** (never a dot): ``"model.layers.*"`` = the direct children of
                ``model.layers`` (``model.layers.0``, ``model.layers.1``), not their submodules
``**``          a whole segment of its own: **zero or more whole segments**: ``"**.attn"`` = every module named
                ``attn`` at any depth (``attn`` included), ``"a.**.b"`` matches ``a.b``, ``a.x.b``, ``a.x.y.b``;
                ``"model.layers.**"`` = ``model.layers`` and everything below it; ``"**"`` = every name
``?``           one character, not a dot
``[...]``       one character of the set, not a dot (``[0-3]``, ``[!0]``), as in :mod:`fnmatch`
anything else   itself (case-sensitive)
==============  =====================================================================================================

Choices (stated, as the contract asks):

* **Anchoring**: a pattern matches the WHOLE name, never a part of it (``"attn"`` matches ``attn`` only, not
  ``blocks.0.attn``: write ``"**.attn"``).
* ``**`` glued to other characters inside a segment (``"x**"``) is an ordinary ``*`` (as in gitignore).
* ``.`` always separates segments, also inside ``[...]``, so a set never matches a dot.
* Empty patterns and empty segments (``".attn"``, ``"a..b"``, ``"attn."``) are refused: module names have none.
* ``include=None`` (or ``[]``) means ``["**"]`` (every name); a name passes when it matches one ``include`` pattern
  and no ``exclude`` pattern.

Before this module, the globs were :mod:`fnmatch`'s, where ``*`` also crossed dots: ``"model.layers.*"`` then
matched every submodule of every layer (39 modules on a 2-layer Llama instead of 2). A pattern that relied on that,
such as ``"*.attn"``, is now written ``"**.attn"``.

The patterns are compiled once, at construction, into one regular expression for ``include`` and one for
``exclude``; a call is two ``re.fullmatch`` on the name (no per-call ``fnmatch`` nor cache).
:meth:`NameFilter.broad_match_warning` catches the costly mistake: a ``**`` pattern that selects modules nested
inside one another (every submodule of every layer), so that a tap hooking each match captures the same
activations many times over.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence

from entrotrain.errors import EntrotrainError

__all__ = ["GLOB_SYNTAX", "NameFilter", "compile_globs"]

GLOB_SYNTAX = (
    "globs over whole dotted names: '*' = any characters within one name segment, '**' = zero or more whole "
    "segments, '?' = one character, e.g. 'model.layers.*' (the layers), '**.attn' (every 'attn' at any depth)"
)
"""One line to quote in error messages that list module names."""

_ANY_SEGMENTS = r"(?:\.[^.]*)*"  # `**`: zero or more whole segments, each preceded by its dot


def _as_list(patterns: str | Sequence[str] | None, argument: str) -> list[str]:
    if patterns is None:
        return []
    items = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise EntrotrainError(
            f"{argument} must be a glob string or a list of glob strings, got {patterns!r}. E.g. "
            f"{argument}=['model.layers.*'] ({GLOB_SYNTAX})."
        )
    return list(items)


def _bracket(pattern: str, start: int) -> tuple[str, int] | None:
    """The regex of the ``[...]`` set opening at ``start`` and the index after it; ``None`` if it never closes
    (then ``[`` is a literal, as in fnmatch). ``]`` right after ``[`` or ``[!`` is a member."""
    i = start + 1
    negate = i < len(pattern) and pattern[i] == "!"
    i += negate
    end = pattern.find("]", i + 1 if i < len(pattern) and pattern[i] == "]" else i)
    if end < 0:
        return None
    body, parts, k = pattern[i:end], [], 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            lo, hi = body[k], body[k + 2]
            if lo <= hi:  # an empty range (z-a) adds nothing, as in fnmatch
                parts.append(f"{re.escape(lo)}-{re.escape(hi)}")
            k += 3
        else:
            parts.append(re.escape(body[k]))
            k += 1
    members = "".join(parts)
    if negate:
        return f"[^.{members}]", end + 1
    return (f"(?!\\.)[{members}]" if members else "(?!)"), end + 1


def _segment(segment: str) -> str:
    """Regex of one pattern segment (no dot inside): ``*`` → ``[^.]*``, ``?`` → ``[^.]``, ``[...]`` → a set."""
    out, i = [], 0
    while i < len(segment):
        c = segment[i]
        if c == "*":
            while i < len(segment) and segment[i] == "*":
                i += 1
            out.append("[^.]*")
            continue
        if c == "?":
            out.append("[^.]")
        elif c == "[" and (found := _bracket(segment, i)) is not None:
            regex, i = found
            out.append(regex)
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _translate(pattern: str, argument: str) -> str:
    """Regex (no anchors) matching ``"." + name`` for the names that ``pattern`` matches."""
    segments = pattern.split(".")
    if not pattern or any(not s for s in segments):
        raise EntrotrainError(
            f"{argument} pattern {pattern!r} has an empty name segment (empty pattern, leading, trailing or doubled "
            f"'.'); module names are dotted like 'model.layers.0'. Use e.g. '**.attn' ({GLOB_SYNTAX})."
        )
    return "".join(_ANY_SEGMENTS if s == "**" else r"\." + _segment(s) for s in segments)


def compile_globs(patterns: Sequence[str], argument: str = "include") -> re.Pattern[str] | None:
    """One compiled regex for the union of ``patterns`` (``None`` when there are none), to be ``fullmatch``-ed
    against ``"." + name``. Raises :class:`EntrotrainError` (naming ``argument``) for an invalid pattern."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{_translate(p, argument)})" for p in patterns))


def _ancestors(name: str) -> list[str]:
    """``"a.b.c"`` → ``["a", "a.b"]``."""
    segments = name.split(".")
    return [".".join(segments[:k]) for k in range(1, len(segments))]


def _generalise(names: Sequence[str]) -> str:
    """The pattern that keeps the segments all ``names`` share (same depth) and puts ``*`` where they differ."""
    columns = zip(*(n.split(".") for n in names))
    return ".".join(col[0] if len(set(col)) == 1 else "*" for col in columns)


def _suggestion(matched: Sequence[str], outer: Sequence[str]) -> tuple[str, int]:
    """A narrower pattern and its match count: the shallowest repeated block (a level with a numeric segment,
    i.e. the children of a ModuleList such as ``model.layers.*``), else the outermost matches generalised."""
    by_shape: dict[str, list[str]] = {}
    for name in matched:
        shape = ".".join("*" if s.isdigit() else s for s in name.split("."))
        by_shape.setdefault(shape, []).append(name)
    repeated = [s for s, group in by_shape.items() if "*" in s.split(".") and len(group) > 1]
    if repeated:
        best = min(repeated, key=lambda s: (s.count(".") + 1, -len(by_shape[s])))
        return best, len(by_shape[best])
    depth = min(n.count(".") for n in outer)
    level = [n for n in outer if n.count(".") == depth]
    return _generalise(level), len(level)


class NameFilter:
    """``include`` / ``exclude`` globs over dotted module names (syntax and choices: module docstring).

    A name passes when it matches one of ``include`` (default ``["**"]``: every name) and none of ``exclude``.

    Args:
        include: glob or globs to keep, e.g. ``"model.layers.*"`` or ``["**.attn", "lm_head"]``; ``None`` = all.
        exclude: glob or globs to drop.

    Raises:
        EntrotrainError: a pattern that is not a string, is empty or has an empty segment.

    Example:
        >>> f = NameFilter("model.layers.*", exclude="model.layers.0")
        >>> [f(n) for n in ("model.layers.1", "model.layers.1.mlp", "model.layers.0")]
        [True, False, False]
    """

    def __init__(self, include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None) -> None:
        given = _as_list(include, "include")
        self.default_include = not given
        self.include: list[str] = given or ["**"]
        self.exclude: list[str] = _as_list(exclude, "exclude")
        self._include = compile_globs(self.include, "include")
        self._exclude = compile_globs(self.exclude, "exclude")
        self._pattern_regexes = [re.compile(_translate(p, "include")) for p in self.include]
        self._warned = False

    def __call__(self, name: str) -> bool:
        dotted = "." + name
        return self._include.fullmatch(dotted) is not None and (  # type: ignore[union-attr]
            self._exclude is None or self._exclude.fullmatch(dotted) is None
        )

    def __repr__(self) -> str:
        return f"NameFilter(include={self.include!r}, exclude={self.exclude!r})"

    def matches(self, pattern_index: int, name: str) -> bool:
        """Whether ``name`` matches ``self.include[pattern_index]`` alone (``exclude`` ignored)."""
        return self._pattern_regexes[pattern_index].fullmatch("." + name) is not None

    def broad_match_warning(
        self, names: Iterable[str], *, owner: str = "tap", factor: float = 4.0, stacklevel: int = 2
    ) -> str | None:
        """Warn (``UserWarning``, once per filter) when an ``include`` pattern selects modules nested inside one
        another: more than ``factor`` × as many matches as there are *outermost* matches (matches with no matched
        ancestor). A tap that hooks every match then captures the same activations that many times over, e.g.
        ``"model.layers.**"`` or the default ``"**"`` on a Llama (39 modules where the 2 layers were meant). A
        pattern without ``**`` matches names of one depth only and never warns.

        Args:
            names: the candidate module names (those the tap could hook, e.g. ``named_modules()`` without
                containers); only those passing the whole filter count.
            owner: who selects (``"RepresentationEntropyMonitor"``), named in the message.
            factor: the tolerated ratio matches / outermost matches.
            stacklevel: passed to :func:`warnings.warn`.

        Returns:
            The message when it warned now, else ``None`` (nothing broad, or already warned by this filter).
        """
        if self._warned:
            return None
        kept = [n for n in names if self(n)]
        lines = []
        for index, pattern in enumerate(self.include):
            if "**" not in pattern.split("."):
                continue
            matched = [n for n in kept if self.matches(index, n)]
            chosen = set(matched)
            outer = [n for n in matched if not any(a in chosen for a in _ancestors(n))]
            if not outer or len(matched) <= factor * len(outer):
                continue
            narrower, count = _suggestion(matched, outer)
            given = "the default include '**' (every module)" if self.default_include else f"include {pattern!r}"
            lines.append(
                f"{owner}: {given} matches {len(matched)} modules nested inside one another ({len(outer)} outermost: "
                f"{outer[:4]}{' ...' if len(outer) > 4 else ''}), so each activation is captured about "
                f"{len(matched) / len(outer):.0f}× over. A narrower pattern: include=[{narrower!r}] ({count} modules; "
                "'*' = one name segment, '**' = any number of segments)."
            )
        if not lines:
            return None
        self._warned = True
        message = "\n".join(lines)
        warnings.warn(message, UserWarning, stacklevel=stacklevel)
        return message
