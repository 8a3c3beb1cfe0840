"""Errors that the command line turns into exit code 2 with one line on stderr."""

from __future__ import annotations

__all__ = ["UserError", "PatternError", "ShapeError"]


class UserError(Exception):
    """Bad input from the user: a wrong pattern, shape, path or option.

    The CLI prints ``str(err)`` as one line and exits with code 2, no traceback.
    Anything raised for a user must be this class (or a subclass) and must be
    raised before anything is written to disk.
    """


class PatternError(UserError, ValueError):
    """A pattern string that does not parse; names the position and the character."""

    def __init__(self, message: str, *, pattern: str = "", position: int | None = None):
        super().__init__(message)
        self.pattern = pattern
        self.position = position


class ShapeError(UserError, ValueError):
    """A shape whose fields are inconsistent; names the field."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field
