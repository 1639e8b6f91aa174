"""``python -m qlight``: LightningCLI (fit, validate, test, predict) plus the ``study``, ``recipes`` and
``export`` commands."""

from __future__ import annotations

import inspect
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import set_loader
from jsonargparse._loaders_dumpers import yaml_load
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from qlight.class_path import one_line
from qlight.classifier import ImageClassifier
from qlight.data.class_path import DEFAULT_DATA, datamodule_class, model_classes_from_data
from qlight.errors import QlightError
from qlight.launched_rank import end_with_launcher
from qlight.models import BACKBONE_FORMS

DESCRIPTION = (
    "Train, test and quantize image classifiers. The whole quantization study: "
    "python -m qlight study --config configs/study.yaml (python -m qlight study --help). "
    "Every PTQ recipe, method and granularity: python -m qlight recipes. "
    "A saved model for ONNX Runtime: python -m qlight export <file> --to onnx."
)
PRECISION_ALIASES = ("32", "16", "bf16")  # Lightning's short names of 32-true, 16-mixed and bf16-mixed
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

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Lightning checks the accelerator, devices and strategy here, and answers with a traceback.
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, TypeError, ValueError) as err:
            raise QlightError(
                f"Lightning refuses the trainer settings ({one_line(err)}): check trainer.accelerator, "
                "trainer.devices and trainer.strategy"
            ) from err


def _qlight_error(err: BaseException) -> QlightError | None:
    """The QlightError behind ``err`` (jsonargparse wraps errors raised while it builds classes), or one
    for a checkpoint that weights-only loading refuses (``--ckpt_path``, read by Lightning)."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, QlightError):
            return err
        if isinstance(err, pickle.UnpicklingError):
            unsafe = re.search(r"GLOBAL ([\w.]+)", str(err))
            if unsafe:
                return QlightError(
                    f"a checkpoint asks to unpickle what weights-only loading refuses ({unsafe.group(1)}): pass a "
                    "checkpoint that Lightning wrote"
                )
            return QlightError(f"a checkpoint is not a PyTorch file or is corrupt ({one_line(err)[:200]})")
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _yaml_without_aliases(stream: str) -> Any:
    """jsonargparse's YAML loader, after a pass over the events (no expansion, linear time) that
    refuses aliases: nine nested ``*alias`` lists (a "billion laughs") expand to gigabytes."""
    if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(stream, Loader=yaml.SafeLoader)):
        raise yaml.YAMLError("qlight configs take no YAML aliases (*name): write the values out")
    return yaml_load(stream)


def _arguments(argv: list[str]) -> list[tuple[str, Any]]:
    """Each flag of ``argv`` with its value, in the order jsonargparse applies them (the last wins); a
    ``--config`` flag comes with its file's parsed content (None when jsonargparse is left to report it).
    An empty config file is refused here (jsonargparse says only "Unexpected config: ")."""
    named: list[tuple[str, Any]] = []
    for flag, value in zip(argv, [*argv[1:], None], strict=True):
        key, _, inline = flag.partition("=")
        value = inline if inline else value
        if key != "--config" or value is None:
            named.append((key, value))
            continue
        path = Path(value)
        text = path.read_text(errors="replace") if path.is_file() else None
        if text is not None and not text.strip():
            raise QlightError(f"config {path} is empty: give it settings, or leave out --config {path}")
        try:
            named.append((key, _yaml_without_aliases(text) if text else None))
        except yaml.YAMLError:
            named.append((key, None))  # jsonargparse reports it
    return named


def _named(arguments: list[tuple[str, Any]], section: str, key: str) -> list[Any]:
    """What the flags ``--<section>.<key>`` (and ``--data`` for the data's class path) and the configs'
    ``section: {key: ...}`` name, in order; a config's ``data: <class path>`` counts as its class path."""
    flags = (f"--{section}.{key}", "--data") if section == "data" else (f"--{section}.{key}",)
    named = []
    for flag, value in arguments:
        if flag in flags and value is not None:
            named.append(value)
        elif flag == "--config" and isinstance(value, dict):
            spec = value.get(section)
            if isinstance(spec, dict):
                named.append(spec.get(key))
            elif section == "data":
                named.append(spec)  # data: <class path>
    return named


def _check_precision(arguments: list[tuple[str, Any]]) -> None:
    """The last ``trainer.precision`` named must be one ImageClassifier trains in: jsonargparse answers an
    unknown one with its usage (70 lines), and ``64-true`` fails at the first batch with a traceback."""
    from qlight.study.results import PRECISIONS

    named = [value for value in _named(arguments, "trainer", "precision") if value is not None]
    if named and str(named[-1]) not in (*PRECISIONS, *PRECISION_ALIASES):
        raise QlightError(f"trainer.precision {named[-1]} is not supported: give one of {', '.join(PRECISIONS)}")


def _data_settings(arguments: list[tuple[str, Any]]) -> list[str]:
    """The data settings the flags and configs name besides the class path (``--data.val_size``, a
    config's ``data: {val_size: ...}`` or its ``init_args``), in order, each once."""
    keys: list[str] = []
    for flag, value in arguments:
        if flag.startswith("--data.") and flag != "--data.class_path":
            keys.append(flag.removeprefix("--data.").removeprefix("init_args.").split(".")[0])
        elif flag == "--config" and isinstance(value, dict) and isinstance(value.get("data"), dict):
            spec = value["data"]
            settings = spec.get("init_args") if "class_path" in spec else spec
            keys.extend(settings if isinstance(settings, dict) else ())
    return list(dict.fromkeys(keys))


def _check_data_settings(arguments: list[tuple[str, Any]], cls: type[LightningDataModule]) -> None:
    """Settings of another DataModule (configs/smoke.yaml's CIFAR sizes before ``--data ImageFolderDataModule``)
    are one line here; jsonargparse answers them with its usage (70 lines)."""
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    foreign = [key for key in _data_settings(arguments) if key not in parameters]
    if foreign:
        raise QlightError(
            f"{cls.__name__} takes no {', '.join(foreign)}: leave out the config or flags that set them "
            f"(configs/smoke.yaml sets CIFAR's), or give {cls.__name__}'s own settings"
        )


def _check_arguments(argv: list[str]) -> str:
    """What jsonargparse reports in a screenful, in one line: an empty ``--config`` file, a ``--data`` class
    path that is not a DataModule or settings it does not take, and a precision qlight does not train in.
    Returns the class path of the data class the arguments name (CIFAR-100's when none), to be the parser's
    default: jsonargparse carries the default class's arguments (``val_size``) over to a class named later."""
    arguments = _arguments(argv)
    _check_precision(arguments)
    data, cls = DEFAULT_DATA, None
    for class_path in _named(arguments, "data", "class_path"):
        if isinstance(class_path, str) and not class_path.lstrip().startswith("{"):
            cls = datamodule_class(class_path)
            data = f"{cls.__module__}.{cls.__qualname__}"
    if cls is not None:
        _check_data_settings(arguments, cls)
    return data


def main(args: list[str] | None = None) -> None:
    """Entry point; user errors end as one ``error: ...`` line and exit code 2."""
    end_with_launcher()
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
