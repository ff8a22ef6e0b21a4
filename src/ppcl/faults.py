"""The fault-injection hook of the SIGKILL tests: a named point where a process can be made to stop and wait.

``PPCL_TEST_PAUSE="<where>:<at>"`` names one point; when the process reaches it, it touches the file named by
``PPCL_TEST_PAUSE_FILE`` and sleeps, so a test can SIGKILL it at exactly that point on any machine speed. Points:

- ``step:N``: after optimiser step ``N``, before any checkpoint of it;
- ``checkpoint:N``: inside the temp folder of step ``N``'s checkpoint, every file written, not yet renamed;
- ``metrics:N``: halfway through appending step ``N``'s row to ``metrics.jsonl`` (half the line is on disk);
- ``write:NAME``: inside the temp folder of any atomic write of a folder named ``NAME`` (e.g. ``write:addon``, the
  final add-on of a run), every file written, not yet renamed.

Unset (always, outside tests) every point is a no-op costing one dictionary lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_ENV = "PPCL_TEST_PAUSE"
PAUSE_FILE_ENV = "PPCL_TEST_PAUSE_FILE"


def pausing_at(where: str, at: int | str) -> bool:
    """Whether :data:`PAUSE_ENV` names this point (lets a writer put the process in a half-written state first)."""
    return os.environ.get(PAUSE_ENV) == f"{where}:{at}"


def fault_point(where: str, at: int | str) -> None:
    """Stop here when :data:`PAUSE_ENV` names this point; does nothing otherwise."""
    if not pausing_at(where, at):
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        Path(marker).write_text(f"{where}:{at}\n")
    time.sleep(600)  # the test kills the process long before this ends
