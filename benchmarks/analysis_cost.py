"""Cost of `ppcl calibrate` + `ppcl analyze` on the committed toy teacher: wall time and peak memory per stage.

Each stage runs as its own process (the CLI, exactly as a user runs it); peak RSS is read from the child's rusage.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import append


def _run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PPCL_NO_PROGRESS": "1"})
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all children so far; each stage is measured in a fresh process order.
    return seconds, max(peak, before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="keep the artefacts here (default: a temp folder)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ppcl-analysis-"))
    ppcl = [sys.executable, "-m", "ppcl", "-q"]
    cal_s, cal_mb = _run([*ppcl, "calibrate", "--out", str(out / "calibration")])
    ana_s, ana_mb = _run([*ppcl, "analyze", "--calibration", str(out / "calibration"), "--out", str(out / "report")])
    append("Analysis cost on the toy teacher (defaults: 32 prompts x 6 timesteps x CFG halves = 384 samples)", f"""
| stage | wall time | peak RSS (process) |
|---|---|---|
| `ppcl calibrate --out CAL` | {cal_s:.1f} s | {cal_mb:.0f} MiB |
| `ppcl analyze --calibration CAL --out REP` | {ana_s:.1f} s | {ana_mb:.0f} MiB |
| total | {cal_s + ana_s:.1f} s | |

Torch threads: {os.environ.get("OMP_NUM_THREADS", "default")}. Each stage is one CLI process (imports included).
""")


if __name__ == "__main__":
    main()
