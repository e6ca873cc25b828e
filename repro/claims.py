"""Published claims: `results/published/<paper>.yaml`, one entry per headline number of a paper."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# libyaml's loader where PyYAML was built with it: ten times faster, and every run reads all the claims
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

COMPARE_KINDS = ("ratio", "absolute", "peak_fraction")
AGGREGATES = ("mean", "max", "min", "last", "largest_x_within")
SCALES = ("smoke", "small", "paper")


@dataclass(frozen=True)
class Compare:
    kind: str
    metrics: tuple[str, ...]  # `metric:` in the file: one name, or several in priority order (a renamed metric)
    providers: tuple[str, ...]
    where: dict[str, Any] = field(default_factory=dict)
    aggregate: str = "mean"
    tolerance: float = 0.1
    comparable_at: tuple[str, ...] = ("small", "paper")
    # an exact figure (a parameter count, a cache size): beyond `tolerance` on the better side is missed too
    two_sided: bool = False
    # for aggregate `largest_x_within`: the claim is the largest x (a compression, a budget) up to which `metric`
    # stays within `tolerance` (relative) of the `reference` provider's, in the quality's own direction, at every x
    # (records.largest_x_within)
    quality: dict[str, Any] | None = None


@dataclass(frozen=True)
class Claim:
    paper: str
    id: str
    claim: str
    value: float
    unit: str
    higher_is_better: bool
    hardware: str
    setting: str
    source: str
    verified: bool
    task: str
    compare: Compare
    note: str = ""


_CLAIM_KEYS = {"id", "claim", "value", "unit", "higher_is_better", "hardware", "setting", "source", "verified",
               "task", "compare", "note"}
_COMPARE_KEYS = {"kind", "metric", "providers", "where", "aggregate", "tolerance", "comparable_at", "quality",
                 "two_sided"}
_QUALITY_KEYS = {"reference", "tolerance", "higher_is_better"}


def _check_keys(where: str, data: dict, allowed: set, required: set) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}={data!r} must be a mapping of {sorted(allowed)}")
    unknown, missing = set(data) - allowed, required - set(data)
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; missing keys {sorted(missing)}"
                         f" (allowed: {sorted(allowed)})")


def _check_type(where: str, value: Any, types: tuple, what: str) -> None:
    if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
        raise ValueError(f"{where}={value!r} is not {what}")


def _parse_claim(paper: str, where: str, raw: dict) -> Claim:
    _check_keys(where, raw, _CLAIM_KEYS, _CLAIM_KEYS - {"note"})
    for key in ("higher_is_better", "verified"):
        _check_type(f"{where}.{key}", raw[key], (bool,), "true or false")
    for key in ("id", "claim", "unit", "hardware", "setting", "source", "task"):
        _check_type(f"{where}.{key}", raw[key], (str,), "a string")
    _check_keys(f"{where}.compare", raw["compare"], _COMPARE_KEYS, {"kind", "metric", "providers"})
    cmp = dict(raw["compare"])
    for key in ("metric", "providers", "comparable_at"):  # a claim no record could ever match
        if key not in cmp:
            continue
        names = [cmp[key]] if isinstance(cmp[key], str) else cmp[key]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{where}.compare.{key}={cmp[key]!r} must be a name or a non-empty list of names")
        cmp[key] = tuple(names)
    if "tolerance" in cmp:
        _check_type(f"{where}.compare.tolerance", cmp["tolerance"], (int, float), "a number")
        if cmp["tolerance"] < 0:
            raise ValueError(f"{where}.compare.tolerance={cmp['tolerance']} must be >= 0")
    if "two_sided" in cmp:
        _check_type(f"{where}.compare.two_sided", cmp["two_sided"], (bool,), "true or false")
    if not isinstance(cmp.get("where", {}), dict):
        raise ValueError(f"{where}.compare.where={cmp['where']!r} must map row keys to a value or a list of values")
    if cmp["kind"] not in COMPARE_KINDS:
        raise ValueError(f"{where}.compare.kind={cmp['kind']!r} is not one of {COMPARE_KINDS}")
    if cmp.get("aggregate", "mean") not in AGGREGATES:
        raise ValueError(f"{where}.compare.aggregate={cmp['aggregate']!r} is not one of {AGGREGATES}")
    if (cmp.get("aggregate") == "largest_x_within") != ("quality" in cmp):
        raise ValueError(f"{where}.compare: aggregate largest_x_within and a quality block go together")
    if "quality" in cmp:
        _check_keys(f"{where}.compare.quality", cmp["quality"], _QUALITY_KEYS, _QUALITY_KEYS)
        # a list or a number there matches no provider: the claim would read "not yet run" whatever ran
        _check_type(f"{where}.compare.quality.reference", cmp["quality"]["reference"], (str,), "a provider's name")
        _check_type(f"{where}.compare.quality.tolerance", cmp["quality"]["tolerance"], (int, float), "a number")
        if cmp["quality"]["tolerance"] < 0:
            raise ValueError(f"{where}.compare.quality.tolerance={cmp['quality']['tolerance']} must be >= 0")
        _check_type(f"{where}.compare.quality.higher_is_better", cmp["quality"]["higher_is_better"], (bool,),
                    "true or false")
    bad_scales = set(cmp.get("comparable_at", ())) - set(SCALES)
    if bad_scales:
        raise ValueError(f"{where}.compare.comparable_at has {sorted(bad_scales)}; scales are {SCALES}")
    _check_type(f"{where}.value", raw["value"], (int, float), "a number")
    cmp["metrics"] = cmp.pop("metric")
    return Claim(paper=paper, **{**raw, "value": float(raw["value"]), "compare": Compare(**cmp)})


def load_yaml(path: Path) -> Any:
    """A YAML file's data; ValueError naming the file and where in it the syntax breaks (PyYAML's error, read
    from a string, names no file, and is no ValueError that `repro-report` reports in a line)."""
    try:
        return yaml.load(Path(path).read_text(), Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None


def load_paper(path: Path) -> tuple[str, dict[str, Any], list[Claim]]:
    """One paper's file: its name, its header (title, source) and its claims."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict) or data.get("paper") != path.stem:
        raise ValueError(f"{path}: top-level key 'paper' must equal the file name {path.stem!r}")
    if not isinstance(data.get("claims"), list):
        raise ValueError(f"{path}: top-level key 'claims' must be a list of claims")
    header = {k: v for k, v in data.items() if k != "claims"}
    claims = [_parse_claim(path.stem, f"{path.name}: claims[{i}]", raw) for i, raw in enumerate(data["claims"])]
    ids = [c.id for c in claims]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate claim ids {duplicates}")
    return path.stem, header, claims


def load_published(root: Path) -> dict[str, tuple[dict[str, Any], list[Claim]]]:
    """All papers under `root`, by paper name: (header, claims)."""
    papers = {}
    for path in sorted(Path(root).glob("*.yaml")):
        name, header, claims = load_paper(path)
        papers[name] = (header, claims)
    return papers


def claims_for_task(published: dict, task: str) -> list[Claim]:
    return [c for _, claims in published.values() for c in claims if c.task == task]
