"""``python -m qlight``: LightningCLI (fit, validate, test, predict) plus the ``study``, ``recipes`` and
``export`` commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import set_loader
from jsonargparse._loaders_dumpers import yaml_load
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from qlight.classifier import ImageClassifier
from qlight.data.class_path import DEFAULT_DATA, datamodule_class, model_classes_from_data
from qlight.errors import QlightError
from qlight.models import BACKBONE_FORMS

DESCRIPTION = (
    "Train, test and quantize image classifiers. The whole quantization study: "
    "python -m qlight study --config configs/study.yaml (python -m qlight study --help). "
    "Every PTQ recipe, method and granularity: python -m qlight recipes. "
    "A saved model for ONNX Runtime: python -m qlight export <file> --to onnx."
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


class QlightCLI(LightningCLI):
    """LightningCLI with any LightningDataModule as ``--data`` (CIFAR-100 by default) and the model's
    ``num_classes`` taken from the data when the data knows it."""

    def __init__(self, *args: Any, data_class_path: str = DEFAULT_DATA, **kwargs: Any) -> None:
        self.data_class_path = data_class_path
        super().__init__(*args, **kwargs)

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # LightningCLI's, but for the backbone: a config can name one, not hold a ready nn.Module, and
        # with nn.Module in its type jsonargparse lists every Module subclass (800 lines of --help).
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_class_arguments(ImageClassifier, "model", fail_untyped=False, sub_configs=True, skip={"backbone"})
        parser.add_argument("--model.backbone", type=str | dict[str, Any], default="vgg11_bn", help=BACKBONE_FORMS)
        parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True)
        parser.set_defaults({"data": {"class_path": self.data_class_path}})

    def before_instantiate_classes(self) -> None:
        model_classes_from_data(self.config[self.subcommand] if self.subcommand else self.config)


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


def _data_class_paths(argv: list[str]) -> list[Any]:
    """What each ``--config`` file and ``--data``/``--data.class_path`` flag names as the data class, in the
    order jsonargparse applies them (the last wins); an empty config file is refused where it is read."""
    named: list[Any] = []
    for flag, value in zip(argv, [*argv[1:], None], strict=True):
        key, _, inline = flag.partition("=")
        value = inline if inline else value
        if key in ("--data", "--data.class_path") and value is not None:
            named.append(value)
        elif key == "--config" and value is not None:
            path = Path(value)
            text = path.read_text(errors="replace") if path.is_file() else None
            if text is not None and not text.strip():
                raise QlightError(f"config {path} is empty: give it settings, or leave out --config {path}")
            try:
                config = _yaml_without_aliases(text) if text else None
            except yaml.YAMLError:
                continue  # jsonargparse reports it
            spec = config.get("data") if isinstance(config, dict) else None
            named.append(spec.get("class_path") if isinstance(spec, dict) else spec)
    return named


def _check_arguments(argv: list[str]) -> str:
    """What jsonargparse reports in a screenful, in one line: an empty ``--config`` file (it says only
    "Unexpected config: ") and a ``--data`` class path that is not a DataModule. Returns the class path of
    the data class the arguments name (CIFAR-100's when none), to be the parser's default: jsonargparse
    carries the default class's arguments (``val_size``) over to a class named later."""
    data = DEFAULT_DATA
    for class_path in _data_class_paths(argv):
        if isinstance(class_path, str) and not class_path.lstrip().startswith("{"):
            cls = datamodule_class(class_path)
            data = f"{cls.__module__}.{cls.__qualname__}"
    return data


def main(args: list[str] | None = None) -> None:
    """Entry point; user errors end as one ``error: ...`` line and exit code 2."""
    argv = sys.argv[1:] if args is None else list(args)
    set_loader("yaml", _yaml_without_aliases, exceptions=(yaml.YAMLError,))
    try:
        data_class_path = _check_arguments(argv)
        if argv[:1] == ["recipes"]:
            from qlight.quantization.recipes.base import describe_recipes

            print(describe_recipes())
            sys.exit(0)
        if argv[:1] == ["export"]:
            from qlight.export_cli import export_main

            sys.exit(export_main(argv[1:]))
        if argv[:1] == ["study"]:
            from qlight.study.runner import study_main

            sys.exit(study_main(argv[1:], data_class_path))
        QlightCLI(
            ImageClassifier,
            LightningDataModule,
            subclass_mode_data=True,
            data_class_path=data_class_path,
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
