"""The one exception type for problems a user can fix (bad recipe, data, path or flag).

The CLI prints it as one clear message and exits non-zero, never with a traceback. Anything else
that escapes is a bug in qlora-phi3 and keeps its traceback.
"""

__all__ = ["RunFailed", "UserError"]


class UserError(Exception):
    """A problem with the user's input; ``str(err)`` says what, where, and how to fix it."""

    exit_code = 2


class RunFailed(UserError):
    """The run stopped on a condition it cannot train through (NaN, out of memory); the message says why
    and what to change."""

    exit_code = 3
