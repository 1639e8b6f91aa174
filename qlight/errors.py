"""Errors meant for the user: the CLI prints them as one line, never as a traceback."""


class QlightError(Exception):
    """A problem with the user's input or environment; the message says how to fix it."""


class QlightWarning(UserWarning):
    """Something a result depends on that the user should know; PTQ shows it in the row's ``note``."""


class UnsupportedByRuntime(ValueError):
    """A runtime cannot run this model, for the reason the message gives (a known limit, not a fault):
    the row records it, and the run goes on without a traceback."""
