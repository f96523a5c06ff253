"""NameFilter: segment globs ('*' within a segment, '**' = zero or more whole segments) against a brute-force
segment matcher, whole-name anchoring, validation, and the nested-match warning."""

from __future__ import annotations

import fnmatch
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from entrotrain.errors import EntrotrainError
from entrotrain.taps.name_filter import GLOB_SYNTAX, NameFilter, compile_globs


def brute_match(pattern: str, name: str) -> bool:
    """Segment by segment: '**' alone eats zero or more whole segments; any other segment is an fnmatch glob
    matched against exactly one name segment (which holds no dot, so its '*' cannot cross one)."""
    ps, ns = pattern.split("."), name.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(ps):
            return j == len(ns)
        if ps[i] == "**":
            return any(match(i + 1, k) for k in range(j, len(ns) + 1))
        return j < len(ns) and fnmatch.fnmatchcase(ns[j], ps[i]) and match(i + 1, j + 1)

    return match(0, 0)


NAME_SEGMENT = st.text(alphabet="ab01_[]", min_size=1, max_size=4)
NAMES = st.lists(NAME_SEGMENT, min_size=1, max_size=5).map(".".join)
TOKENS = st.sampled_from(["a", "b", "0", "1", "_", "*", "?", "**", "[ab]", "[!a]", "[0-1]", "[1-0]", "[", "]", "[]a]"])
PATTERN_SEGMENT = st.one_of(st.just("**"), st.lists(TOKENS, min_size=1, max_size=3).map("".join))
PATTERNS = st.lists(PATTERN_SEGMENT, min_size=1, max_size=5).map(".".join)


@given(pattern=PATTERNS, name=NAMES)
def test_one_pattern_equals_the_brute_force_segment_matcher(pattern, name):
    assert NameFilter(pattern)(name) == brute_match(pattern, name)


@given(include=st.lists(PATTERNS, max_size=3), exclude=st.lists(PATTERNS, max_size=2), names=st.lists(NAMES, max_size=6))
def test_include_and_exclude_lists_equal_the_brute_force(include, exclude, names):
    f = NameFilter(include, exclude)
    for name in names:
        kept = any(brute_match(p, name) for p in include or ["**"])
        assert f(name) == (kept and not any(brute_match(p, name) for p in exclude))


@given(pattern=PATTERNS.filter(lambda p: "**" not in p.split(".")), name=NAMES)
def test_without_double_star_a_match_has_as_many_segments_as_the_pattern(pattern, name):
    """'*', '?' and '[...]' never match a dot: only '**' changes the depth."""
    if NameFilter(pattern)(name):
        assert name.count(".") == pattern.count(".")


@given(head=st.lists(NAME_SEGMENT, max_size=3), tail=st.lists(NAME_SEGMENT, max_size=3))
def test_double_star_matches_zero_or_more_whole_segments(head, tail):
    f = NameFilter("a.**.b")
    assert f(".".join(["a", *head, "b"]))
    assert f("a.b")  # zero segments
    assert not f(".".join(["x", *head, "b"]))
    assert NameFilter("**")(".".join(["a", *head, *tail]))


def test_the_documented_examples():
    layers = NameFilter("model.layers.*")
    assert layers("model.layers.0") and layers("model.layers.17")
    assert not layers("model.layers.0.mlp")  # fnmatch's '*' crossed this dot: 39 modules on a Llama
    assert not layers("model.layers")
    attn = NameFilter("**.attn")
    assert attn("attn") and attn("blocks.0.attn") and attn("a.b.c.attn")
    assert not attn("blocks.0.attn.qkv") and not attn("blocks.0.attention")
    assert not NameFilter("attn")("blocks.0.attn")  # whole-name anchoring
    assert NameFilter("*.attn")("blocks.attn") and not NameFilter("*.attn")("blocks.0.attn")
    assert NameFilter("blocks.?")("blocks.3") and not NameFilter("blocks.?")("blocks.12")
    assert NameFilter("blocks.[!0]")("blocks.1") and not NameFilter("blocks.[!0]")("blocks.0")
    assert NameFilter("x**")("xyz") and not NameFilter("x**")("x.y")  # '**' inside a segment is a '*'
    assert NameFilter("model.layers.**")("model.layers") and NameFilter("model.layers.**")("model.layers.0.mlp.up")
    assert NameFilter("a[.]b")("a[.]b")  # '.' splits even inside brackets: literal '[' and ']b'
    assert not NameFilter("[!a]")(".") and not NameFilter("[+-0]")(".")  # no set matches a dot
    assert NameFilter("blocks.0.attn[1]")("blocks.0.attn1")  # a set, as in fnmatch


def test_defaults_exclude_and_attributes():
    every = NameFilter()
    assert every.include == ["**"] and every.exclude == [] and every.default_include
    assert all(every(n) for n in ("a", "a.b", "model.layers.0.mlp"))
    assert NameFilter([]).include == ["**"]
    f = NameFilter(["**.attn", "lm_head"], exclude="blocks.0.*")
    assert not f.default_include and f.include == ["**.attn", "lm_head"] and f.exclude == ["blocks.0.*"]
    assert f("blocks.1.attn") and f("lm_head") and not f("blocks.0.attn") and not f("blocks.1.mlp")
    assert repr(f) == "NameFilter(include=['**.attn', 'lm_head'], exclude=['blocks.0.*'])"
    assert compile_globs([]) is None
    assert "'**'" in GLOB_SYNTAX


@pytest.mark.parametrize("bad", ["", ".attn", "attn.", "a..b", "."])
def test_empty_segments_are_refused_naming_the_argument(bad):
    with pytest.raises(EntrotrainError, match=r"include pattern .* empty name segment"):
        NameFilter(bad)
    with pytest.raises(EntrotrainError, match=r"exclude pattern"):
        NameFilter("**", exclude=[bad])


@pytest.mark.parametrize("bad", [3, [None], ["a", 1], {"a"}])
def test_non_string_patterns_are_refused(bad):
    with pytest.raises(EntrotrainError, match=r"include must be a glob string or a list of glob strings, got"):
        NameFilter(bad)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))


class Toy(nn.Module):
    """model.embed, model.layers.{0,1,2} (each attn + mlp.{0,1,2}), model.norm, lm_head."""

    def __init__(self, n_layers: int = 3):
        super().__init__()
        self.model = nn.Module()
        self.model.embed = nn.Embedding(5, 4)
        self.model.layers = nn.ModuleList(Block() for _ in range(n_layers))
        self.model.norm = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 5)


def candidates(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and not isinstance(m, (nn.ModuleList, nn.ModuleDict))]


def test_nested_double_star_warns_once_with_a_narrower_pattern():
    names = candidates(Toy())
    f = NameFilter("model.layers.**")
    assert sum(map(f, names)) == 18  # 3 layers × (block, attn, mlp, mlp.0, mlp.1, mlp.2)
    with pytest.warns(UserWarning) as caught:
        message = f.broad_match_warning(names, owner="RepresentationEntropyMonitor")
    assert len(caught) == 1 and str(caught[0].message) == message
    assert "RepresentationEntropyMonitor" in message and "'model.layers.**'" in message
    assert "matches 18 modules" in message and "3 outermost" in message
    assert "include=['model.layers.*'] (3 modules" in message
    suggested = NameFilter("model.layers.*")
    assert sum(map(suggested, names)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f.broad_match_warning(names) is None  # once per filter


def test_default_include_warns_as_the_default():
    with pytest.warns(UserWarning, match=r"the default include '\*\*' \(every module\) matches 22 modules"):
        NameFilter().broad_match_warning(candidates(Toy()), owner="ActivationTap")


@pytest.mark.parametrize(
    "include, exclude",
    [
        ("**.attn", None),  # 3 matches, none nested
        ("model.layers.*", None),  # no '**': one depth only
        (["model.layers.**"], ["**.mlp.*"]),  # exclude removes the nesting: 3 blocks + 3 attn + 3 mlp = 9 ≤ 4×3
        ("**.mlp", None),
    ],
)
def test_no_warning_without_nesting_beyond_the_factor(include, exclude):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert NameFilter(include, exclude).broad_match_warning(candidates(Toy())) is None


def test_warning_factor_is_a_threshold():
    names = candidates(Toy())
    f = NameFilter("**.mlp.**")  # 3 mlp + 9 children = 12 = 4 × 3 outermost: not more than the factor
    assert f.broad_match_warning(names) is None
    with pytest.warns(UserWarning, match=r"include=\['model.layers.\*.mlp'\] \(3 modules"):
        assert NameFilter("**.mlp.**").broad_match_warning(names, factor=3.0) is not None
