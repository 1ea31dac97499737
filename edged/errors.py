"""The one exception type users see: a one-line message naming the problem and where it is."""

import difflib
from collections.abc import Iterable


class EdgedError(Exception):
    """A user-facing error. The CLI prints ``edged: <message>`` and exits non-zero, no traceback."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), for the one
    line a user sees: libraries' messages run to paragraphs and stack dumps."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``word``, or nothing when none is
    close: the hint every unknown key, value and command gets."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
