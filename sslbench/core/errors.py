"""Errors that sslbench reports to the user as one line, without a traceback.

Every error a user can cause (a bad recipe key, a missing file, an unknown plugin name) is raised as a
:class:`UserError`; the CLI prints ``error: <message>`` and exits with code 2. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; printed as one line by the CLI (exit code 2)."""

    exit_code = 2


class RecipeError(UserError):
    """A recipe key that is unknown, of the wrong type, out of range, or names something that does not exist.

    ``key`` is the dotted key path (``stages[0].optimizer.lr``) and ``source`` the recipe file, when known.
    """

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")

    def with_source(self, source: str) -> "RecipeError":
        return RecipeError(self.key, self.message, source)


class PluginError(UserError):
    """A plugin problem the user must fix: two plugins registering one name, or a name nobody registered."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""
