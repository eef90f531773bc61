"""Captions and prompts for the toy domain, generated from the attributes.

Captions train the small CLIP: varied phrasings that name a random subset of the attributes, so text
like "a red shape" or "a circle on the left" lands near every image it describes. Every value word is
canonical (the words of ``ATTRIBUTES``) and the colour sets of shape and background are disjoint, so a
caption can be checked against the attributes it claims. ``attribute_prompt`` gives the zero-shot
classification prompt for one value; ``edit_prompt`` the (source, target) text pair of an edit.
"""

from __future__ import annotations

import itertools

import numpy as np

from models.toy.domain import ATTRIBUTES, NAMES, Attributes

# Wordings per position value and per background pattern; a caption picks one of each.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "center": ("in the center", "at the center"),
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
}
BACKGROUND_PATTERNS: tuple[str, ...] = ("on a {} background", "on {}", "against a {} background")
# How often a caption names each attribute: the shape noun almost always, the rest often.
INCLUDE_P: dict[str, float] = {
    "shape": 0.9,
    "shape_color": 0.8,
    "background": 0.6,
    "size": 0.5,
    "position": 0.5,
}
NEUTRAL = "a shape"  # the text of "no particular attribute": the source of an edit by default


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _compose(
    attrs: Attributes,
    include: frozenset[str],
    position_k: int,
    background_k: int,
    position_first: bool,
) -> str:
    """One phrasing: [size] [colour] noun [position] [background] (position/background order varies)."""
    words = [getattr(attrs, a) for a in ("size", "shape_color") if a in include]
    noun = attrs.shape if "shape" in include else "shape"
    tail = []
    if "position" in include:
        tail.append(POSITION_PHRASES[attrs.position][position_k])
    if "background" in include:
        tail.append(BACKGROUND_PATTERNS[background_k].format(attrs.background))
    if not position_first:
        tail.reverse()
    return " ".join([_article(" ".join(words + [noun]))] + tail)


def caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """A random phrasing naming a random subset of the attributes (at least the shape or its colour)."""
    include = {a for a in NAMES if rng.random() < INCLUDE_P[a]}
    if not include & {"shape", "shape_color"}:
        include.add("shape" if rng.random() < 0.5 else "shape_color")
    text = _compose(
        attrs,
        frozenset(include),
        int(rng.integers(2)),
        int(rng.integers(len(BACKGROUND_PATTERNS))),
        bool(rng.random() < 0.5),
    )
    return text.capitalize() if rng.random() < 0.2 else text


def all_phrasings(attrs: Attributes) -> list[str]:
    """Every phrasing ``caption`` can produce for these attributes (lower case), without duplicates."""
    out: dict[str, None] = {}
    for r in range(1, len(NAMES) + 1):
        for subset in itertools.combinations(NAMES, r):
            if not set(subset) & {"shape", "shape_color"}:
                continue
            for pk, bk, first in itertools.product(
                range(2), range(len(BACKGROUND_PATTERNS)), (True, False)
            ):
                out[_compose(attrs, frozenset(subset), pk, bk, first)] = None
    return list(out)


def mentioned(text: str) -> dict[str, set[str]]:
    """The attribute values a text names, per attribute (value words are unique across attributes)."""
    words = set(text.lower().replace(",", " ").split())
    return {name: {v for v in values if v in words} for name, values in ATTRIBUTES.items()}


def attribute_prompt(attr_name: str, value: str) -> str:
    """Zero-shot prompt naming one value: "a circle", "a red shape", "a shape on a black background"."""
    if value not in ATTRIBUTES.get(attr_name, ()):
        raise ValueError(
            f"{attr_name}={value!r}: not an attribute value ({ATTRIBUTES.get(attr_name)})"
        )
    if attr_name == "shape":
        return _article(value)
    if attr_name in ("shape_color", "size"):
        return _article(f"{value} shape")
    if attr_name == "background":
        return f"{NEUTRAL} on a {value} background"
    return f"{NEUTRAL} {POSITION_PHRASES[value][0]}"


def edit_prompt(attr_name: str, target: str, source: str | None = None) -> tuple[str, str]:
    """(source text, target text) of an edit: ("a circle", "a square"), or from ``NEUTRAL`` ("a shape")."""
    target_text = attribute_prompt(attr_name, target)
    return (NEUTRAL if source is None else attribute_prompt(attr_name, source)), target_text


def all_edits() -> list[tuple[str, str, str]]:
    """Every (attribute, source value, target value) with source ≠ target: the edits evaluation can run."""
    return [(a, s, t) for a, values in ATTRIBUTES.items() for s in values for t in values if s != t]


def expected_values(source: str, target: str) -> dict[str, int]:
    """What an edit from ``source`` to ``target`` text should make the oracle read (class indices): each
    attribute the target names with exactly one value that the source does not name the same way."""
    src, tgt = mentioned(source), mentioned(target)
    return {
        a: ATTRIBUTES[a].index(next(iter(v))) for a, v in tgt.items() if len(v) == 1 and v != src[a]
    }


def changed_attributes(source: str, target: str) -> set[str]:
    """The attributes whose named values differ between the two texts, with or without one expected value
    ("a shape + a shape" → "a red shape + a blue shape": the colour)."""
    src, tgt = mentioned(source), mentioned(target)
    return {a for a in ATTRIBUTES if tgt[a] and tgt[a] != src[a]}
