"""Import what a config names by class path (``package.module.Class``), with one line when it fails."""

from __future__ import annotations

import importlib

from qlight.errors import QlightError


def one_line(err: BaseException) -> str:
    """``Type: message`` of ``err`` on one line, for an error line that quotes someone else's exception."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def import_object(class_path: str, what: str) -> object:
    """The object ``class_path`` names; ``what`` says in the error what was being looked for."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise QlightError(
            f"cannot import {what} {class_path} ({one_line(err)}): check the name, and that its package is "
            "installed or on PYTHONPATH"
        ) from None
    except Exception as err:  # the module itself fails: a SyntaxError, or an error raised while it runs
        raise QlightError(f"cannot import {what} {class_path}: its module raised {one_line(err)}: fix it") from None
