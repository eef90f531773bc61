"""The prompts file of a bulk edit (YAML or CSV), expanded into the edit variants every image receives.

YAML: a list (or ``{prompts: [...]}``) of entries::

    - {id: red, source: a shape, target: a red shape}                 # one edit
    - {id: big, source: a shape, target: a large shape, tau: 0.05, strengths: [0.5, 1, 2]}   # sweep
    - {id: red_big, combine: [red, big]}                              # multi-attribute: Δt summed
    - {id: red_to_big, interpolate: [red, big], omegas: [0, 0.5, 1]}  # Δt = (1-ω)·Δt_red + ω·Δt_big

CSV: columns ``source,target`` and optionally ``id,tau,strength`` (one edit per row).

A malformed file (unreadable, missing columns, unknown ids) is a ``PromptFileError``: nothing could be
run sensibly. A prompt whose *text* is unusable (empty, longer than the text encoder's context) is not:
the edit stage records every edit of that prompt as failed with the reason, and the run goes on.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import yaml

from infra.config import ConfigError
from infra.storage.fsio import open_uri
from models.edit_directions import Term


class PromptFileError(ConfigError):
    """The prompts file itself is unusable (as opposed to one prompt's text)."""


@dataclass(frozen=True)
class EditVariant:
    """One edit applied to every image: Δt = Σ weight·(t(target) − t(source)) over ``terms``."""

    prompt_id: str
    terms: tuple[Term, ...]
    tau: float | None = None  # None: the run's bulk_edit.tau, until ``resolve_tau`` sets it
    strength: float = 1.0
    omega: float | None = None  # interpolation weight, when the prompt is an ω sweep
    suffix: str = ""  # key suffix that tells sweep points apart (no dots)

    @property
    def source_text(self) -> str:
        return " + ".join(t[0] for t in self.terms)

    @property
    def target_text(self) -> str:
        return " + ".join(t[1] for t in self.terms)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditVariant:
        """The inverse of ``to_dict`` (after a JSON round trip: terms come back as lists)."""
        return cls(**{**data, "terms": tuple(tuple(t) for t in data["terms"])})


def resolve_tau(variants: Sequence[EditVariant], run_tau: float) -> list[EditVariant]:
    """Each variant with the τ it is edited with: its own, else the run's ``bulk_edit.tau``."""
    return [v if v.tau is not None else replace(v, tau=run_tau) for v in variants]


def load_prompts(uri: str, storage_options: dict[str, Any] | None = None) -> list[EditVariant]:
    """Read a prompts file (``.yaml``/``.yml``/``.csv``) and expand sweeps, combinations, interpolations."""
    try:
        with open_uri(uri, "rb", storage_options) as f:
            text = f.read().decode("utf-8")
    except (FileNotFoundError, OSError) as exc:
        raise PromptFileError(f"prompts file {uri}: cannot read it ({exc})") from exc
    entries = _csv_entries(text, uri) if uri.lower().endswith(".csv") else _yaml_entries(text, uri)
    if not entries:
        raise PromptFileError(f"prompts file {uri}: no prompts")
    return expand(entries, uri)


def expand(entries: list[dict[str, Any]], where: str) -> list[EditVariant]:
    """Entries (dicts as in the module docstring) → variants, in file order."""
    named: dict[str, dict[str, Any]] = {}
    variants: list[EditVariant] = []
    for n, entry in enumerate(entries):
        pid = _prompt_id(entry, n, where)
        if pid in named:
            raise PromptFileError(f"{where}: prompt id '{pid}' appears twice")
        named[pid] = entry
        variants.extend(_variants(pid, entry, named, where))
    return variants


def _variants(
    pid: str, entry: dict[str, Any], named: dict[str, dict[str, Any]], where: str
) -> list[EditVariant]:
    tau = _number(entry.get("tau"), pid, "tau", where)
    given = _number(entry.get("strength"), pid, "strength", where)
    strength = 1.0 if given is None else given
    if "interpolate" in entry:
        a, b = (_terms(ref, named, pid, where) for ref in _pair(entry["interpolate"], pid, where))
        omegas = entry.get("omegas", [0.0, 0.25, 0.5, 0.75, 1.0])
        return [
            EditVariant(pid, _weighted(a, 1 - w) + _weighted(b, w), tau, strength, w, f"w{k}")
            for k, w in enumerate(_numbers(omegas, pid, "omegas", where))
        ]
    if "combine" in entry:
        refs = entry["combine"]
        if not isinstance(refs, list) or len(refs) < 2:
            raise PromptFileError(
                f"{where}: prompt '{pid}': 'combine' needs a list of two or more prompt ids"
            )
        terms = tuple(t for ref in refs for t in _terms(ref, named, pid, where))
    else:
        terms = _own_terms(entry, pid, where)
    if "strengths" in entry:
        return [
            EditVariant(pid, terms, tau, s, None, f"s{k}")
            for k, s in enumerate(_numbers(entry["strengths"], pid, "strengths", where))
        ]
    return [EditVariant(pid, terms, tau, strength)]


def _own_terms(entry: dict[str, Any], pid: str, where: str) -> tuple[Term, ...]:
    missing = [k for k in ("source", "target") if k not in entry]
    if missing:
        raise PromptFileError(
            f"{where}: prompt '{pid}' has no {' and no '.join(missing)} "
            "(an edit needs 'source' and 'target'; or 'combine'/'interpolate')"
        )
    source, target = ("" if entry[k] is None else str(entry[k]) for k in ("source", "target"))
    return ((source, target, 1.0),)


def _terms(ref: Any, named: dict[str, dict[str, Any]], pid: str, where: str) -> tuple[Term, ...]:
    if ref not in named:
        raise PromptFileError(
            f"{where}: prompt '{pid}' refers to '{ref}', which is not an earlier prompt id"
        )
    return _own_terms(named[ref], str(ref), where)


def _weighted(terms: tuple[Term, ...], w: float) -> tuple[Term, ...]:
    return tuple((s, t, weight * w) for s, t, weight in terms)


def _pair(value: Any, pid: str, where: str) -> tuple[Any, Any]:
    if not isinstance(value, list) or len(value) != 2:
        raise PromptFileError(
            f"{where}: prompt '{pid}': 'interpolate' needs exactly two prompt ids"
        )
    return value[0], value[1]


def _prompt_id(entry: Any, n: int, where: str) -> str:
    if not isinstance(entry, dict):
        raise PromptFileError(f"{where}: entry {n + 1} is not a mapping (got {entry!r})")
    raw = str(entry.get("id") or f"p{n:03d}")
    pid = re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-")
    if not pid or "__" in pid:
        raise PromptFileError(
            f"{where}: entry {n + 1}: id {raw!r} must have letters or digits and no '__'"
        )
    return pid


def _number(value: Any, pid: str, name: str, where: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PromptFileError(
            f"{where}: prompt '{pid}': {name} must be a number, got {value!r}"
        ) from None


def _numbers(values: Any, pid: str, name: str, where: str) -> list[float]:
    if not isinstance(values, list) or not values:
        raise PromptFileError(
            f"{where}: prompt '{pid}': {name} must be a non-empty list of numbers"
        )
    return [float(_number(v, pid, name, where)) for v in values]  # type: ignore[arg-type]


def _yaml_entries(text: str, where: str) -> list[dict[str, Any]]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PromptFileError(f"prompts file {where}: not valid YAML: {exc}") from None
    if isinstance(data, dict) and "prompts" in data:
        data = data["prompts"]
    if not isinstance(data, list):
        raise PromptFileError(
            f"prompts file {where}: expected a list of prompts (or 'prompts: [...]')"
        )
    return data


def _csv_entries(text: str, where: str) -> list[dict[str, Any]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    header = set(rows[0]) if rows else set()
    if rows and not {"source", "target"} <= header:
        raise PromptFileError(
            f"prompts file {where}: CSV needs columns 'source' and 'target' "
            f"(found {sorted(header)})"
        )
    return [
        {k: v for k, v in row.items() if k in {"id", "source", "target", "tau", "strength"}}
        for row in rows
    ]
