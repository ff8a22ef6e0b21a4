"""Two real processes (torch.distributed, gloo on CPU) train exactly what one process trains on the same global batch:
under DDP (depth distillation, width training and fine-tuning) and FSDP2-sharded (depth distillation).

Data split (see :mod:`ppcl.distill.trainer`): process ``rank`` of ``P`` draws micro-batch
``(step * A + micro) * P + rank``. So 2 processes with accumulation 1 see, at step ``s``, micro-batches ``2s`` and
``2s + 1`` — the very batches 1 process with accumulation 2 sees. DDP all-reduces (sums) the two gradients and divides
by 2; accumulation adds the two gradients each divided by 2.

Tolerance: with P = 2 both sides are bit-identical in exact terms — dividing by 2 is exact in binary floating point
and a sum of two addends does not depend on their order — and each process runs single-threaded kernels, so the
observed difference is 0. The test still allows ``atol=1e-6`` (fp32 ulp at the weights' scale ~1e-7, times a few
steps) because gloo may chunk or order a reduction differently on other builds or for P > 2, where fp32 summation
order changes the last bits; AdamW's update is scale-invariant in the gradient, so a relative error ε in a gradient
moves a weight by at most ~lr·ε per step (1e-3 · 1e-6), far below that bound. A sharding bug (wrong or repeated
batches, a missing all-reduce) moves the weights by ~6e-3 (measured: two lone processes instead of one group),
three orders above it.

The run uses ``python -m torch.distributed.run`` (torchrun) rather than ``accelerate launch --cpu``: in accelerate
1.15 the latter starts multi-CPU jobs through ``mpirun`` only, which CI does not have; torchrun's environment
(``RANK``/``WORLD_SIZE``/``MASTER_ADDR``) is what ``accelerate launch`` sets on GPUs too, and ppcl's trainer makes its
``Accelerator(cpu=True)`` join that gloo group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppcl.addon import WEIGHTS_FILE
from ppcl.io import load_tensors

WORKER = Path(__file__).with_name("mp_distill_worker.py")


def _env() -> dict[str, str]:
    # One thread per process: the two ranks and the reference then run the same kernels in the same order.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _rows(folder: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The 1-process reference (accumulation 2), 2 processes under DDP and 2 processes FSDP2-sharded (depth only),
    all launched at once: the CI machine has two cores and each run spends most of its time importing."""
    root = tmp_path_factory.mktemp("mp")
    out = {"one": root / "one", "two": root / "two", "sharded": root / "sharded"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    commands = [
        [sys.executable, str(WORKER), str(out["one"]), "--accumulation", "2", "--more-stages"],
        [*torchrun, str(out["two"]), "--accumulation", "1", "--more-stages"],
        [*torchrun, str(out["sharded"]), "--accumulation", "1", "--shard"],
    ]
    procs = [
        subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in commands
    ]
    for proc in procs:
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-4000:]
    return out


def _assert_same_addon(got_dir: Path, want_dir: Path, what: str, atol: float) -> None:
    want = load_tensors(want_dir / "addon" / WEIGHTS_FILE, f"reference add-on {what}")
    got = load_tensors(got_dir / "addon" / WEIGHTS_FILE, f"{what} add-on")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=f"{what} {key}")


def _assert_same_rows(got_dir: Path, want_dir: Path) -> None:
    # Only the main process writes metrics: one row per step, with the losses averaged over both processes.
    got, want = _rows(got_dir), _rows(want_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    for a, b in zip(got, want, strict=True):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-6 * max(1.0, abs(float(b["loss"])))  # type: ignore[arg-type]


def test_two_processes_equal_one_process_with_the_same_global_batch(runs: dict[str, Path]) -> None:
    two, one = runs["two"], runs["one"]
    meta = json.loads((two / "addon" / "ppcl_addon.json").read_text())
    assert meta["provenance"]["depth"]["num_processes"] == 2  # really distributed, not two lone runs
    # Depth, then width (projections + a text-pruned student: DDP must allow unused parameters), then fine-tune.
    for stage in ("", "width", "finetune"):
        _assert_same_addon(two / stage, one / stage, f"2-process {stage or 'depth'}", atol=1e-6)
    _assert_same_rows(two, one)


def test_two_sharded_processes_equal_one_process(runs: dict[str, Path]) -> None:
    """FSDP2 (gloo on CPU): each rank holds half of every teacher block and student; the gradients are
    reduce-scattered (averaged) instead of all-reduced, and AdamW steps each half. The same tolerance holds: the only
    new source of difference is the gradient norm for clipping, summed from two halves in another order (relative
    error ~1e-7, scaled by lr · steps in the weights). A sharding bug (wrong halves, a missing reduction, a teacher
    block left sharded) moves the weights by orders of magnitude more."""
    sharded, one = runs["sharded"], runs["one"]
    meta = json.loads((sharded / "addon" / "ppcl_addon.json").read_text())
    depth = meta["provenance"]["depth"]
    assert depth["num_processes"] == 2 and depth["config"]["shard"] is True
    _assert_same_addon(sharded, one, "2-process sharded depth", atol=1e-6)
    _assert_same_rows(sharded, one)


def test_deepspeed_is_refused_before_training_and_fsdp_is_not() -> None:
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from ppcl.distill.checkpoint import check_distributed
    from ppcl.errors import ConfigError

    with pytest.raises(ConfigError, match="does not run under DeepSpeed"):
        check_distributed(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))  # type: ignore[arg-type]
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP):
        check_distributed(SimpleNamespace(distributed_type=kind))  # type: ignore[arg-type]


def test_shipped_accelerate_configs_parse() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    kinds = {path.stem: load_config_from_file(str(path)) for path in sorted(folder.glob("*.yaml"))}
    assert {k: str(c.distributed_type.value) for k, c in kinds.items()} == {
        "1gpu": "NO",
        "ddp_8gpu": "MULTI_GPU",
        "fsdp_8gpu": "FSDP",
        "deepspeed_zero2": "DEEPSPEED",
    }
    assert kinds["deepspeed_zero2"].deepspeed_config["zero_stage"] == 2
    assert kinds["fsdp_8gpu"].fsdp_config["fsdp_version"] == 2  # ppcl shards with fully_shard (FSDP2) itself
    assert all(c.num_processes == (1 if k == "1gpu" else 8) for k, c in kinds.items())
