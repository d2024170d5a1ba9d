"""Declared, validated options — the one mechanism behind every configurable thing in a recipe.

Objectives, evaluators and datasets declare their options as a ``dict[str, Option]``; the recipe parser
validates the user's table against it, fills in defaults and reports problems with the full key path::

    >>> schema = {"temperature": Option(0.2, float, "softmax temperature", min=0.0, min_exclusive=True)}
    >>> validate_options(schema, {"temperature": 0.1}, "stages[0].options")
    {'temperature': 0.1}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from sslbench.core.errors import RecipeError

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "a table"}
_PLURAL_NAMES = {int: "integers", float: "numbers", str: "strings", bool: "booleans", list: "lists", dict: "tables"}


@dataclass(frozen=True)
class Option:
    """One option: its default, expected type, one-line documentation and allowed range or choices.

    ``type`` is one of ``int, float, str, bool, list, dict``; a float option also accepts integers.
    ``item_type`` checks the elements of a list. ``default=None`` with ``required=True`` makes the key mandatory.
    ``nullable`` allows ``None`` (a TOML recipe cannot write it, but defaults may be ``None``).
    ``omit_default``: a key the table leaves out stays out of the validated table (its consumer applies
    ``default``), so an option added to a plugin after recipes were hashed leaves their hashes unchanged; such a
    default must stay the behaviour from before the option existed.
    """

    default: Any
    type: type
    doc: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    item_type: type | None = None
    required: bool = False
    nullable: bool = False
    omit_default: bool = False

    def describe(self) -> str:
        """What is allowed, for error messages and `sslbench list --options`."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        what = _TYPE_NAMES.get(self.type, self.type.__name__)
        if self.type is list and self.item_type is not None:
            what = f"a list of {_PLURAL_NAMES.get(self.item_type, self.item_type.__name__)}"
        bounds = []
        if self.min is not None:
            bounds.append(f"{'>' if self.min_exclusive else '>='} {self.min:g}")
        if self.max is not None:
            bounds.append(f"<= {self.max:g}")
        return what + (" " + " and ".join(bounds) if bounds else "")


def _is_type(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is dict:
        return isinstance(value, Mapping)
    return isinstance(value, expected)


def check_value(option: Option, value: Any, key: str) -> Any:
    """Return ``value`` (floats normalised) or raise :class:`RecipeError` naming ``key`` and what is allowed."""
    if value is None:
        if option.nullable:
            return None
        raise RecipeError(key, f"expected {option.describe()}")
    if option.choices is not None:
        if value not in option.choices:
            raise RecipeError(key, f"got {value!r}, expected {option.describe()}")
        return value
    if not _is_type(value, option.type):
        raise RecipeError(key, f"got {value!r} ({type(value).__name__}), expected {option.describe()}")
    if option.type is float:
        value = float(value)
        if not math.isfinite(value):  # TOML writes nan and inf; no option of a recipe means either
            raise RecipeError(key, f"got {value!r}, expected a finite number ({option.describe()})")
    if option.type is list and option.item_type is not None:
        out = []
        for i, item in enumerate(value):
            if not _is_type(item, option.item_type):
                raise RecipeError(f"{key}[{i}]", f"got {item!r}, expected {option.describe()}")
            if option.item_type is float:
                item = float(item)
                if not math.isfinite(item):
                    raise RecipeError(f"{key}[{i}]", f"got {item!r}, expected a finite number")
            out.append(item)
        value = out
    numbers = value if option.type is list else [value]
    for v in numbers:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            too_low = option.min is not None and (v <= option.min if option.min_exclusive else v < option.min)
            too_high = option.max is not None and v > option.max
            if too_low or too_high:
                raise RecipeError(key, f"got {v!r}, expected {option.describe()}")
    return value


def validate_options(schema: Mapping[str, Option], given: Mapping[str, Any] | None, key_path: str) -> dict:
    """Validate ``given`` against ``schema``: unknown keys are errors, defaults fill the rest (except
    ``omit_default`` options)."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(schema))
    if unknown:
        allowed = ", ".join(sorted(schema)) or "(none)"
        raise RecipeError(f"{key_path}.{unknown[0]}", f"unknown key; allowed keys: {allowed}")
    out = {}
    for name, option in schema.items():
        key = f"{key_path}.{name}"
        if name in given:
            out[name] = check_value(option, given[name], key)
        elif option.required:
            raise RecipeError(key, f"missing; expected {option.describe()}")
        elif not option.omit_default:
            out[name] = option.default
    return out
