"""Write a benchmark's results into its own section of docs/benchmarks.md."""

from __future__ import annotations

import platform
import re
from datetime import date
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    import os

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {date.today().isoformat()}")


def write_section(title: str, command: str, body: str) -> None:
    """Replace (or append) ``## {title}`` in docs/benchmarks.md with the command, machine and body."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    section = f"## {title}\n\nCommand: `{command}`  \nMachine: {machine()}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
