"""Result tables shared by the quantization callbacks: CSV, Markdown and the Lightning loggers."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer


def output_dir(trainer: Trainer, given: str | None, name: str) -> Path:
    """``given`` or ``<log_dir>/<name>`` (the logger's version folder, else ``default_root_dir``)."""
    return Path(given) if given else Path(trainer.log_dir or trainer.default_root_dir) / name


def write_csv(rows: Sequence[dict[str, Any]], path: Path, columns: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def log_to_loggers(
    trainer: Trainer, metrics: dict[str, float], text: dict[str, str] | None = None, step: int | None = None
) -> None:
    """Scalars to every logger; Markdown text to loggers that take it (TensorBoard's ``add_text``)."""
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        add_text = getattr(getattr(logger, "experiment", None), "add_text", None) if trainer.is_global_zero else None
        for tag, body in (text or {}).items() if add_text else ():
            add_text(tag, body, step)
        logger.save()
