"""The one exception type users see: a one-line message naming the problem and where it is."""


class EdgedError(Exception):
    """A user-facing error. The CLI prints ``edged: <message>`` and exits non-zero, no traceback."""
