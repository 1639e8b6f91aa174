"""Errors meant for the user: the CLI prints them as one line, never as a traceback."""


class QlightError(Exception):
    """A problem with the user's input or environment; the message says how to fix it."""


class QlightWarning(UserWarning):
    """Something a result depends on that the user should know; PTQ shows it in the row's ``note``."""


class Unsupported(ValueError):
    """What a recipe or runtime cannot do, for the reason the message gives (a known limit, not a
    fault): a PTQ row records it, and the run goes on without a traceback."""
