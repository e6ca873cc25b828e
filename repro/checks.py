"""Checks of config values, run before any work: each failure names the key, the value and what is allowed."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .context import ConfigError


def as_list(value: Any) -> list:
    """A grid axis from config: one value or a list of them (a list, tuple or OmegaConf ListConfig)."""
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]


def axis(key: str, value: Any) -> list:
    """A grid axis: one value or a non-empty list of distinct ones (an empty one would measure nothing, or quietly
    leave only the other settings; a repeated one would measure a point twice)."""
    values = as_list(value)
    if not values:
        raise ConfigError(f"{key}=[] is empty: give one value or a list of them")
    _none_twice(key, values)
    return values


def choices(key: str, value: Any, allowed: Iterable, empty_ok: bool = False) -> list:
    """A list of choices (which parts, strategies, experiments to run): at least one (none, where `empty_ok`),
    none twice, each one of `allowed`; returned as a list."""
    allowed, values = list(allowed), as_list(value)
    if not values and not empty_ok:
        raise ConfigError(f"{key}=[] is empty: choose some of {allowed}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ConfigError(f"{key}={unknown!r} is not one of {allowed}")
    _none_twice(key, values)
    return values


def _none_twice(key: str, values: list) -> None:
    twice = [v for i, v in enumerate(values) if v in values[:i]]
    if twice:
        raise ConfigError(f"{key} names {twice[0]!r} more than once")


def number(key: str, value: Any, *, integer: bool = True, at_least: float | None = None, above: float | None = None,
           below: float | None = None, at_most: float | None = None, divides: int | None = None,
           finite: bool = False) -> None:
    """`value` is one number of the right kind within the bounds given; a list is refused (a key that takes a list
    of numbers is checked by `numbers`). nan is always refused: it would pass every bound (each comparison with it
    is false). `finite` refuses inf as well, which passes every lower bound."""
    wanted = "an integer" if integer else "a finite number" if finite else "a number"
    bounds = [f">= {at_least:g}" if at_least is not None else "", f"> {above:g}" if above is not None else "",
              f"< {below:g}" if below is not None else "", f"<= {at_most:g}" if at_most is not None else ""]
    what = " ".join([wanted, " and ".join(b for b in bounds if b)]).strip()
    if isinstance(value, Sequence) and not isinstance(value, str):
        raise ConfigError(f"{key}={list(value)!r} must be one value, {what}, not a list")
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind_ok or math.isnan(value) or (finite and math.isinf(value)):
        raise ConfigError(f"{key}={value!r} must be {what}")
    if (at_least is not None and value < at_least) or (above is not None and value <= above) or \
            (below is not None and value >= below) or (at_most is not None and value > at_most):
        raise ConfigError(f"{key}={value!r} must be {what}")
    if divides is not None and divides % value:
        raise ConfigError(f"{key}={value!r} must divide {divides}")


def numbers(key: str, value: Any, **bounds) -> list:
    """A grid axis of numbers (one or a non-empty list of distinct ones, as `axis` takes), each checked as `number`
    checks one; returned as a list."""
    values = axis(key, value)
    for v in values:
        number(key, v, **bounds)
    return values


def choice(key: str, value: Any, allowed: Iterable) -> None:
    """`value` is one of `allowed`; a list is refused (a key that takes a list of them is checked by `choices`)."""
    allowed = list(allowed)
    if isinstance(value, Sequence) and not isinstance(value, str):
        raise ConfigError(f"{key}={list(value)!r} must be one value, one of {allowed}, not a list")
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {allowed}")


def mapping(key: str, value: Any, of: str) -> None:
    """`value` is a mapping (a config block), not null, one value or a list; `of`: what it maps, for the error."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}={value!r} must be a mapping of {of}")


def flag(key: str, value: Any, many: bool = False) -> None:
    """A true/false setting (not bool('no'), which is True); with `many`, or a list of them."""
    if not all(isinstance(v, bool) for v in (as_list(value) if many else [value])):
        raise ConfigError(f"{key}={value!r} must be true or false" + (", or a list of them" if many else ""))


def unread_unless_chosen(read_by: Mapping[str, Iterable], chosen: Iterable, setting: str) -> dict[str, str]:
    """For a task's `unread_keys`: the keys of `read_by` (key -> the choices that read it: the task's parts, LRA's
    tasks) that none of `chosen` reads, each with why; `setting`: what chose them, as the message shows it."""
    unread = {}
    for key, readers in read_by.items():
        readers = list(readers)
        if not set(readers) & set(chosen):
            unread[key] = f"it is read only for {' or '.join(map(str, readers))}, and {setting} has none of them"
    return unread


def names_a_path(name: str) -> bool:
    """Whether a model or checkpoint `name` means a folder here, not a Hub name (organisation/model, or a bare one
    such as gpt2): it starts with /, . or ~, has more than one /, or its organisation is a folder here."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or ("/" in name and Path(name).parent.is_dir())
