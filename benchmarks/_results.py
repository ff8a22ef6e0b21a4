"""Append a benchmark result (with command, machine and date) to benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    """A one-line description of this machine."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def append(title: str, body: str) -> None:
    """Append a section ``title`` with markdown ``body`` to RESULTS.md."""
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"\n## {title}\n\n- command: `{command}`\n- machine: {machine()}\n- date: {date}\n\n{body.strip()}\n"
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach section is appended by the script named in its command.\n")
    with RESULTS.open("a") as handle:
        handle.write(section)
