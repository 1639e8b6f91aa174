"""Import what a config names by class path (``package.module.Class``), with one line when it fails."""

from __future__ import annotations

import importlib

from qlight.errors import QlightError


def import_object(class_path: str, what: str) -> object:
    """The object ``class_path`` names; ``what`` says in the error what was being looked for."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise QlightError(
            f"cannot import {what} {class_path} ({type(err).__name__}: {err}): check the name, and that its "
            "package is installed or on PYTHONPATH"
        ) from None
