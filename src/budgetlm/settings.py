"""Typed settings: dataclass fields that carry their help text, allowed values and a parser for values
written as text, checked whenever a table of them is built. The leaf that config.py (the run's tables)
and models/config.py (the model's) both build on."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import field, fields
from typing import Any, Callable

from budgetlm.budget import parse_duration
from budgetlm.errors import UserError


def opt(default: Any = None, help: str = "", choices: tuple | None = None, factory=None, flag: str | bool | None = None,
        low: float | None = None, high: float | None = None, above: float | None = None,
        parse: Callable[[Any], Any] | None = None, empty: bool = False):
    """A config field with its help text, its allowed values (choices, or numbers in [low, high] or
    above `above`; text that is not blank unless `empty`, where "" means none), a parser for values written
    as text, and (rarely) a flag name of its own (`flag=False`: settable from TOML and Python only)."""
    meta = {"help": help, "choices": choices, "flag": flag, "low": low, "high": high, "above": above, "parse": parse,
            "empty": empty}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def count_or_auto(flag: str, unit: str) -> Callable[[Any], int | str]:
    """A parser for a setting that takes a positive whole number of `unit` or "auto"."""
    def parse(value) -> int | str:
        if value == "auto":
            return "auto"
        try:
            number = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else 0
        except (TypeError, ValueError, OverflowError):
            number = 0
        if number < 1:
            raise UserError(f"{flag} {value!r}: give a positive number of {unit} or auto")
        return number
    return parse


def duration(value) -> float:
    return parse_duration(value)


class Section:
    """A table of settings. Values are checked, and those written as text parsed, whenever one is built
    (from flags, TOML, Python or `dataclasses.replace`), so no bad value reaches a workflow."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, _coerce(type(self), f.name, value, ""))


def flag_name(f: dataclasses.Field) -> str | None:
    """The command-line flag of a field (`n_layer` → `--n-layer`), or None for a field without one."""
    if f.metadata.get("flag") is False:
        return None
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(tp) -> tuple[type, bool]:
    """(scalar type, is_list) of an annotation like `int | None` or `list[str]`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


_KINDS = {int: "int (a whole number)", float: "float (a number)", str: "str (text, in quotes in TOML)",
          bool: "bool (true or false)"}


def _bounds(f: dataclasses.Field) -> str:
    """" > 0 and <= 1": the range a number field allows, as a sentence ends."""
    low, high, above = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("above")
    allowed = " and ".join(f"{sign} {bound if isinstance(bound, int) else f'{bound:g}'}"
                           for sign, bound in ((">", above), (">=", low), ("<=", high)) if bound is not None)
    return f" {allowed}" if allowed else ""


def _coerce(cls, name: str, value: Any, where: str) -> Any:
    f = next(x for x in fields(cls) if x.name == name)
    tp, is_list = _base_type(_hints(cls)[name])
    choices = f.metadata.get("choices")
    parse = f.metadata.get("parse")

    # None is "unset", where that is the default: what a saved TOML's `# key = (auto)` reads back as
    optional = f.default is None

    def one(v):
        if v is None:
            if not optional:
                raise UserError(f"{where}{name}: a value is required (it has no automatic choice)")
            return None
        if parse is not None:
            try:
                return parse(v)
            except UserError as e:
                raise UserError(f"{where}{name}: {e}") from None
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            try:
                v = float(v)
            except OverflowError:
                v = math.inf  # refused below
        if tp is str and isinstance(v, int) and not isinstance(v, bool):
            v = str(v)  # a column named by its position
        if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
            raise UserError(f"{where}{name}: expected {_KINDS.get(tp, tp.__name__)}, got {v!r}")
        if choices and v not in choices:
            raise UserError(f"{where}{name}: {v!r} is not allowed; choose one of {', '.join(map(str, choices))}")
        if tp is str and not v.strip() and not f.metadata.get("empty"):  # e.g. `--tokenizer "$UNSET"`
            raise UserError(f"{where}{name}: {v!r} is blank; give a value, or leave the setting out for its default")
        if tp is float and not math.isfinite(v):
            raise UserError(f"{where}{name}: {v!r} is not a finite number; give a number{_bounds(f)}")
        if tp in (int, float):
            low, high, above = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("above")
            if (low is not None and v < low) or (high is not None and v > high) or (above is not None and v <= above):
                raise UserError(f"{where}{name}: {v!r} is out of range; it must be{_bounds(f)}")
        return v

    if is_list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"{where}{name}: expected a list of {_KINDS.get(tp, tp.__name__)}, got {value!r}")
        return [one(v) for v in value]
    return one(value)


