"""The project's error base: every error it raises for a user carries a message, and optionally
the fix (``hint``) and the flag or mapping key the user typed (``flag``).

Importing this module costs nothing (no torch): the CLI's error path must work even when the
heavy imports are what failed.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class AdpError(Exception):
    """An error meant for the user: ``str(err)`` names the problem, ``hint`` the fix.

    ``exit_code`` is what ``adp`` exits with: 1 (a failure while working) unless a subclass
    says the command line itself was wrong (:class:`UsageError`, 2).
    """

    exit_code = 1
    default_hint: str | None = None  # a class's usual fix, when the raise site gives none

    def __init__(self, message: str = "", *, hint: str | None = None, flag: str | None = None):
        super().__init__(message)
        self.hint = hint if hint is not None else self.default_hint
        self.flag = flag


class UsageError(AdpError):
    """The command cannot run as typed: a flag, a value, a mapping, a path, a request."""

    exit_code = 2


# Here rather than in rewrite.py: the self-check raises it and rewrite runs the self-check, so
# defining it with either would make the two import each other.
class RewriteError(AdpError, RuntimeError):
    """The plan does not fit the graph it is applied to."""


class MissingExtra(UsageError):
    """A command needs a package of one of adp-pass's extras (``serve``, ``plot``)."""


def require_extra(module: str, extra: str) -> ModuleType:
    """``import module``, or :class:`MissingExtra` naming the extra that installs it: the pass
    itself runs without the server's and the plots' packages (pyproject.toml)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there and something it imports is not: not ours to name
        raise MissingExtra(f"{module} is not installed (the '{extra}' extra of adp-pass)",
                           hint=f"pip install 'adp-pass[{extra}]'") from None
