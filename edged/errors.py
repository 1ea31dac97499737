"""The one exception type users see: a one-line message naming the problem and where it is."""


class EdgedError(Exception):
    """A user-facing error. The CLI prints ``edged: <message>`` and exits non-zero, no traceback."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), for the one
    line a user sees: libraries' messages run to paragraphs and stack dumps."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
