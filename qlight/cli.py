"""``python -m qlight``: LightningCLI (fit, validate, test, predict) plus the ``study`` command."""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from qlight.classifier import ImageClassifier
from qlight.data import CIFAR100DataModule
from qlight.errors import QlightError

DESCRIPTION = (
    "Train, test and quantize image classifiers. The whole quantization study: "
    "python -m qlight study --config configs/study.yaml (python -m qlight study --help)."
)
TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "qlight"},
    },
}


def _default_callbacks() -> list:
    # LightningCLI appends these to the callbacks a config lists.
    return [
        ModelCheckpoint(monitor="val/acc1", mode="max", save_last=True, filename="best-{epoch:03d}"),
        LearningRateMonitor(logging_interval="epoch"),
    ]


def main(args: list[str] | None = None) -> None:
    """Entry point; user errors end as one ``error: ...`` line and exit code 2."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] == ["study"]:
            from qlight.study.runner import study_main

            sys.exit(study_main(argv[1:]))
        LightningCLI(
            ImageClassifier,
            CIFAR100DataModule,
            trainer_defaults={**TRAINER_DEFAULTS, "callbacks": _default_callbacks()},
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "python -m qlight", "description": DESCRIPTION},
            args=None if args is None else argv,
        )
    except QlightError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
