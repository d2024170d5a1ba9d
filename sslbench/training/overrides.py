"""Command-line overrides: ``sslbench run RECIPE stages[1].epochs=5 run.name=short`` changes one value without
copying the recipe.

An override is ``KEY=VALUE``. ``KEY`` is a dotted path through the recipe's tables with list indices where the
recipe has arrays of tables (``stages[1].epochs``, ``stages[0].options.mask_ratio``, ``eval[0].k``, ``stages[-1]``
for the last stage). ``VALUE`` is read as a TOML literal (``5``, ``0.6``, ``true``, ``[10, 20]``, ``"text"``,
``{ kind = "linear" }``); anything that is not one is taken as a plain string, so ``run.name=short`` needs no
quotes.

Overrides are applied to the file's contents *before* validation, so an override is checked exactly like the same
line written in the file — an unknown key, a wrong type or an out-of-range value is the usual one-line error naming
the key — and a stage that inherits from an overridden one inherits the overridden value, as it would from the file.
The resolved recipe (and so its hash) holds the result; ``recipe.json`` also lists the overrides as typed.
"""

from __future__ import annotations

import copy
import re
import sys
from typing import Any, Sequence

from sslbench.core.errors import RecipeError, UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Override", "parse_override", "apply_overrides", "overrides_touching"]

# one path component: a bare TOML key, optionally followed by list indices
_COMPONENT = re.compile(r"([A-Za-z0-9_-]+)((?:\[-?\d+\])*)")
_INDEX = re.compile(r"\[(-?\d+)\]")


class Override:
    """One parsed ``KEY=VALUE``: ``path`` is a list of table keys (str) and list indices (int)."""

    def __init__(self, text: str, path: list[str | int], value: Any):
        self.text = text
        self.path = path
        self.value = value

    @property
    def key(self) -> str:
        """The key as the recipe's errors spell it: ``stages[1].options.mask_ratio``."""
        return format_path(self.path)

    def __repr__(self) -> str:
        return f"Override({self.text!r})"


def format_path(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def parse_value(text: str) -> Any:
    """A TOML literal, or the text itself when it is not one (``my_run``, ``ILSVRC/imagenet-1k``)."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(text: str) -> Override:
    """Parse ``KEY=VALUE``; a malformed one is a :class:`UserError` quoting it."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {text!r}: expected KEY=VALUE, e.g. run.seed=1 or stages[0].epochs=5")
    path: list[str | int] = []
    for component in key.split("."):
        match = _COMPONENT.fullmatch(component)
        if not match:
            raise UserError(f"override {text!r}: {component!r} is not a key; expected names joined by dots with "
                            "optional [index], e.g. stages[1].options.mask_ratio")
        path.append(match.group(1))
        path.extend(int(i) for i in _INDEX.findall(match.group(2)))
    return Override(text, path, parse_value(value.strip()))


def _describe(value: Any) -> str:
    return "an array" if isinstance(value, list) else f"a {type(value).__name__} value"


def _set(raw: dict, override: Override) -> None:
    node: Any = raw
    path = override.path
    for depth, part in enumerate(path):
        here = format_path(path[:depth + 1])
        last = depth == len(path) - 1
        if isinstance(part, int):
            if not isinstance(node, list):
                raise RecipeError(format_path(path[:depth]), f"is {_describe(node)}, not an array; cannot apply "
                                                             f"{override.text!r}")
            if not -len(node) <= part < len(node):
                what = format_path(path[:depth])
                count = f"{len(node)} entr{'y' if len(node) == 1 else 'ies'}"
                valid = f" ({what}[0] to {what}[{len(node) - 1}]; negative indices count from the end)" if node else ""
                raise RecipeError(here, f"index out of range: {what} has {count}{valid}")
            if last:
                node[part] = override.value
            else:
                node = node[part]
            continue
        if not isinstance(node, dict):
            raise RecipeError(format_path(path[:depth]), f"is {_describe(node)}, not a table; cannot apply "
                                                         f"{override.text!r}")
        if last:
            node[part] = override.value
            return
        nxt = path[depth + 1]
        if part not in node:
            if isinstance(nxt, int):
                raise RecipeError(format_path(path[:depth + 2]), f"index out of range: the recipe has no {here}")
            node[part] = {}
        node = node[part]


def apply_overrides(raw: dict, overrides: Sequence[str | Override]) -> dict:
    """A copy of the parsed recipe file ``raw`` with every override applied in order (a later one wins)."""
    out = copy.deepcopy(raw)
    for override in overrides:
        _set(out, override if isinstance(override, Override) else parse_override(override))
    return out


def overrides_touching(key: str, overrides: Sequence[Override]) -> list[Override]:
    """The overrides that set ``key``, a table above it or a value inside it (to say in an error where a bad value
    came from). Negative indices name the same entry as the error's positive one only loosely, so they match any."""
    def parts(text: str) -> list[str]:
        return re.findall(r"[A-Za-z0-9_-]+|\[-?\d+\]", text)

    target = parts(key)
    found = []
    for override in overrides:
        mine = parts(override.key)
        n = min(len(mine), len(target))
        if all(a == b or (a.startswith("[-") and b.startswith("[")) for a, b in zip(mine[:n], target[:n])):
            found.append(override)
    return found
