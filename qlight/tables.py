"""Result tables: CSV and Markdown files, written atomically."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qlight.files import atomic_write_text


def write_csv(rows: Sequence[dict[str, Any]], path: Path, columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


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


def write_results(out: Path, title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Write ``out/results.csv`` and ``out/results.md`` (under ``# title``); returns the Markdown table."""
    table = markdown_table(rows, columns)
    write_csv(rows, out / "results.csv", columns)
    atomic_write_text(out / "results.md", f"# {title}\n\n{table}")
    return table
