"""Cost of `ppcl calibrate` + `ppcl analyze` on the committed toy teacher: wall time and peak memory per stage.

Each stage runs as its own process (the CLI, exactly as a user runs it); peak RSS is read from the child's rusage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import append

_CHILD = """
import json, sys, time
from ppcl.cli.main import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
seconds = time.perf_counter() - t0
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"rc": rc, "seconds": seconds, "peak_mib": peak / 1024}))
"""


def _run(args: list[str]) -> tuple[float, float, float]:
    """Wall seconds of the whole process, seconds inside the command (imports excluded) and peak RSS (MiB)."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PPCL_NO_PROGRESS": "1"},
    )
    wall = time.perf_counter() - t0
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    return wall, stats["seconds"], stats["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="keep the artefacts here (default: a temp folder)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ppcl-analysis-"))
    cal = _run(["-q", "calibrate", "--out", str(out / "calibration")])
    ana = _run(["-q", "analyze", "--calibration", str(out / "calibration"), "--out", str(out / "report")])
    append(
        "Analysis cost on the toy teacher (defaults: 32 prompts x 6 timesteps x CFG halves = 384 samples)",
        f"""
| stage | process wall time | command time (no imports) | peak RSS (process) |
|---|---|---|---|
| `ppcl calibrate --out CAL` | {cal[0]:.1f} s | {cal[1]:.1f} s | {cal[2]:.0f} MiB |
| `ppcl analyze --calibration CAL --out REP` | {ana[0]:.1f} s | {ana[1]:.1f} s | {ana[2]:.0f} MiB |
| total | {cal[0] + ana[0]:.1f} s | {cal[1] + ana[1]:.1f} s | |

Torch threads: {os.environ.get("OMP_NUM_THREADS", "default")}. Each stage is one CLI process, as a user runs it.
""",
    )


if __name__ == "__main__":
    main()
