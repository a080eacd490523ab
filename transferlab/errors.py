"""The one exception type a user ever sees.

Anything raised as ``UserError`` is a problem with the user's input or environment
(a wrong name, a missing file, a bad number). The CLI prints its message on one
line and exits with status 2; every other exception is a bug and keeps its traceback.
"""

import difflib


class UserError(Exception):
    """Bad input: the message says what was wrong and how to fix it, on one line."""


class UserTypeError(UserError, TypeError):
    """A value of the wrong type (``pretrain(lr="fast")``): a ``TypeError`` to Python callers, a one-line
    error with exit status 2 on the command line, like any ``UserError``."""


class UserValueError(UserError, ValueError):
    """A value of the right type outside its range or choices (``--epochs 0``): a ``ValueError`` to Python
    callers."""


def suggest(name: str, known) -> str:
    """' (did you mean X?)' for the nearest known names, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(close)}?)" if close else ""
