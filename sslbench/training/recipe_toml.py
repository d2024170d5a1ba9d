"""Recipes as TOML text: reading a recipe file (:func:`load_toml`, with one-line errors naming the file) and writing
a resolved recipe back (:func:`to_toml`, the run folder's ``recipe.toml``). Both are re-exported by
:mod:`sslbench.training.recipe`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from sslbench.core.errors import UserError
from sslbench.training.spec import Recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_toml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a UTF-8 text file (byte {exc.start}); a recipe is TOML, which is UTF-8") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {' '.join(str(exc).split())}") from None



def to_toml(recipe: Recipe | dict) -> str:
    """Write a resolved recipe back as TOML (None values are left out: TOML has no null); a recipe that came with
    command-line overrides says so in a comment at the top."""
    overrides = recipe.overrides if isinstance(recipe, Recipe) else ()
    recipe = recipe.as_dict() if isinstance(recipe, Recipe) else recipe
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items() if x is not None) + " }"
        raise TypeError(type(v))

    def table(header: str, body: dict) -> None:
        lines.append(header)
        for k, v in body.items():
            if v is not None and not (isinstance(v, dict) and k in ("optimizer", "schedule", "options", "teacher")):
                lines.append(f"{k} = {value(v)}")
        lines.append("")

    if overrides:
        lines += ["# resolved by sslbench from the recipe file with these command-line overrides:",
                  "#   " + " ".join(overrides), ""]
    for section in ("run", "backbone", "data", "monitor"):
        if section in recipe:
            table(f"[{section}]", recipe[section])
    for stage in recipe["stages"]:
        table("[[stages]]", stage)
        for sub in ("optimizer", "schedule", "options", "teacher"):
            if stage.get(sub) is not None:
                table(f"[stages.{sub}]", stage[sub])
    for evaluation in recipe["eval"]:
        table("[[eval]]", evaluation)
    return "\n".join(lines)
