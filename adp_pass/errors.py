"""The project's error base: every error it raises for a user carries a message, and optionally
the fix (``hint``) and the flag or mapping key the user typed (``flag``).

Importing this module costs nothing (no torch): the CLI's error path must work even when the
heavy imports are what failed.
"""

from __future__ import annotations


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
