"""``python -m qlight``: LightningCLI (fit, validate, test, predict) plus the ``study`` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import set_loader
from jsonargparse._loaders_dumpers import yaml_load
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from qlight.classifier import ImageClassifier
from qlight.data import CIFAR100DataModule
from qlight.errors import QlightError

DESCRIPTION = (
    "Train, test and quantize image classifiers. The whole quantization study: "
    "python -m qlight study --config configs/study.yaml (python -m qlight study --help). "
    "Every PTQ recipe, method and granularity: python -m qlight recipes."
)
TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "qlight"},
    },
}


def _default_callbacks() -> list:
    # LightningCLI appends these to the callbacks a config lists. ``last.ckpt`` is a checkpoint of
    # its own, written after every epoch: ``save_last`` writes it only when the best one improves.
    return [
        ModelCheckpoint(monitor="val/acc1", mode="max", filename="best-{epoch:03d}"),
        ModelCheckpoint(filename="last", monitor=None, save_top_k=1, enable_version_counter=False),
        LearningRateMonitor(logging_interval="epoch"),
    ]


def _qlight_error(err: BaseException) -> QlightError | None:
    """The QlightError behind ``err``: jsonargparse wraps errors raised while it builds classes."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, QlightError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _yaml_without_aliases(stream: str) -> Any:
    """jsonargparse's YAML loader, after a pass over the events (no expansion, linear time) that
    refuses aliases: nine nested ``*alias`` lists (a "billion laughs") expand to gigabytes."""
    if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(stream, Loader=yaml.SafeLoader)):
        raise yaml.YAMLError("qlight configs take no YAML aliases (*name): write the values out")
    return yaml_load(stream)


def _check_config_files(argv: list[str]) -> None:
    """An empty ``--config`` file is a mistake (jsonargparse says only "Unexpected config: ")."""
    paths = [b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"]
    paths += [a.removeprefix("--config=") for a in argv if a.startswith("--config=")]
    for path in map(Path, paths):
        if path.is_file() and not path.read_text(errors="replace").strip():
            raise QlightError(f"config {path} is empty: give it settings, or leave out --config {path}")


def main(args: list[str] | None = None) -> None:
    """Entry point; user errors end as one ``error: ...`` line and exit code 2."""
    argv = sys.argv[1:] if args is None else list(args)
    set_loader("yaml", _yaml_without_aliases, exceptions=(yaml.YAMLError,))
    try:
        _check_config_files(argv)
        if argv[:1] == ["recipes"]:
            from qlight.quantization.recipes.base import describe_recipes

            print(describe_recipes())
            sys.exit(0)
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
    except Exception as err:
        cause = _qlight_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
