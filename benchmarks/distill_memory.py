"""Peak memory of depth distillation vs teacher inference on the toy teacher (CPU: process RSS).

Each workload runs in a fresh child process. Reported: the peak RSS (VmHWM) and the growth of the peak over the RSS
right after loading the teacher (imports and weights excluded), which is what the workload itself adds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import append

CHILD = r"""
import json, sys, tempfile
import torch
from ppcl.toy.teacher import ToyTeacher
from ppcl.distill import DistillConfig, distill_depth
from ppcl.toy.distill_data import ToyDistillData
from ppcl.addon import PruningAddon
from ppcl.plan import PruningPlan

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
mode, batch, steps, plan_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
teacher = ToyTeacher.load()
data = ToyDistillData(teacher, batch, seed=0)
base = rss("VmRSS")
if mode == "inference":
    with torch.no_grad():
        for i in range(steps):
            teacher.transformer(**data.batch(i), return_dict=False)
else:
    addon = PruningAddon.from_plan(teacher.transformer, PruningPlan.load(plan_path))
    config = DistillConfig(mode=mode, steps=steps, batch_size=batch, checkpoint_every=0)
    distill_depth(teacher.transformer, addon, data, config, tempfile.mkdtemp())
print(json.dumps({"base_mib": base, "peak_mib": rss("VmHWM")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plan", required=True, help="a plan for the toy teacher (e.g. from `ppcl analyze`)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    rows = {}
    for mode in ("inference", "nonsequential", "sequential"):
        plan = str(Path(args.plan).resolve())  # the child runs in a temp folder
        out = subprocess.run(
            [sys.executable, "-c", CHILD, mode, str(args.batch_size), str(args.steps), plan],
            check=True,
            capture_output=True,
            text=True,
            cwd=tempfile.gettempdir(),
            env={**__import__("os").environ, "PPCL_NO_PROGRESS": "1"},
        )
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    inf = rows["inference"]["peak_mib"] - rows["inference"]["base_mib"]
    lines = ["| workload | peak RSS | peak − RSS after loading | vs inference |", "|---|---|---|---|"]
    for mode, r in rows.items():
        grow = r["peak_mib"] - r["base_mib"]
        lines.append(
            f"| {mode} (batch {args.batch_size}) | {r['peak_mib']:.0f} MiB | {grow:.0f} MiB | "
            f"{grow / max(inf, 1e-9):.1f}x |"
        )
    append("Peak memory: depth distillation vs teacher inference (toy teacher, CPU)", "\n".join(lines))


if __name__ == "__main__":
    main()
