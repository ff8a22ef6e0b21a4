"""Faults: a distillation SIGKILLed between and during checkpoint writes resumes to exactly the uninterrupted result;
a checkpoint is never visible half-written; bad output folders and NaN gradients fail clearly.

The kill points come from the fault-injection hook ``PPCL_TEST_PAUSE`` (see :mod:`ppcl.faults`): ``step:N`` pauses
after optimiser step N before its checkpoint, ``checkpoint:N`` inside the temp folder of step N's checkpoint (every file
written, not renamed), ``metrics:N`` with half of step N's ``metrics.jsonl`` row appended, ``write:addon`` inside the
temp folder of the run's final add-on. The paused process touches ``PPCL_TEST_PAUSE_FILE``
and the test SIGKILLs it there, so the kill lands at exactly that point on any machine speed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ppcl.addon import WEIGHTS_FILE, PruningAddon
from ppcl.distill.run_folder import LOCK_FILE, read_trainer_state
from ppcl.distill.trainer import DistillConfig, distill_depth
from ppcl.errors import ArtefactError, TrainingError
from ppcl.faults import PAUSE_ENV, PAUSE_FILE_ENV
from ppcl.io import load_tensors
from tiny_models import build_tiny, two_span_plan

WORKER = Path(__file__).with_name("mp_distill_worker.py")
STEPS, EVERY = 6, 2


def _start(out: Path, *extra: str, pause: str | None = None, marker: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(PAUSE_ENV, None)
    if pause is not None and marker is not None:
        env.update({PAUSE_ENV: pause, PAUSE_FILE_ENV: str(marker)})
    cmd = [sys.executable, str(WORKER), str(out), "--steps", str(STEPS), "--checkpoint-every", str(EVERY), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_at(proc: subprocess.Popen[str], marker: Path) -> None:
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended (code {proc.returncode}) before the kill point:\n{proc.communicate()[0][-3000:]}"
            )
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _checkpoint_step(out: Path) -> int:
    """The visible checkpoint's step; asserts it is complete and loadable (a half-written one fails here)."""
    folder = out / "checkpoint"
    state = read_trainer_state(folder)
    weights = load_tensors(folder / WEIGHTS_FILE, "checkpoint")
    meta = json.loads((folder / "ppcl_addon.json").read_text())
    assert weights and all(torch.isfinite(v).all() for v in weights.values()) and meta["provenance"]["checkpoint"]
    return int(state["step"])


def test_sigkill_between_and_during_checkpoint_writes_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    ref_out, cut = tmp_path / "ref", tmp_path / "cut"
    reference = _start(ref_out)  # in parallel with the killed runs below

    # 1. Killed between checkpoint writes: after step 3, the step-2 checkpoint is the visible one.
    _kill_at(_start(cut, pause="step:3", marker=tmp_path / "m1"), tmp_path / "m1")
    assert _checkpoint_step(cut) == 2 and not (cut / "addon").exists()

    # 2. Killed during a checkpoint write: step 4's folder is complete in its temp sibling but not renamed yet, so
    #    the visible checkpoint is still step 2's, whole.
    _kill_at(_start(cut, "--resume", pause="checkpoint:4", marker=tmp_path / "m2"), tmp_path / "m2")
    temps = list(cut.glob(".checkpoint.*.tmp"))
    assert temps and (temps[0] / "trainer_state.json").is_file()  # the kill really landed inside the write
    assert _checkpoint_step(cut) == 2

    # 3. Resumed to the end.
    last = _start(cut, "--resume")
    out, _ = last.communicate(timeout=300)
    assert last.returncode == 0, out[-3000:]
    assert not list(cut.glob(".checkpoint.*"))  # the interrupted write's leftovers are cleaned up
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-3000:]

    want = load_tensors(ref_out / "addon" / WEIGHTS_FILE, "reference")
    got = load_tensors(cut / "addon" / WEIGHTS_FILE, "resumed")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    rows = [json.loads(r) for r in (cut / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(r) for r in (ref_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


def test_kills_during_the_metrics_append_and_inside_the_final_addon_save_resume_bit_exact(tmp_path: Path) -> None:
    """Issue 14: a kill halfway through a ``metrics.jsonl`` append leaves a cut-short line, which the resume drops; a
    kill inside the final add-on's write leaves only its temp folder. Both resume to the uninterrupted result, and the
    finished folder holds no debris and no lock."""
    ref_out, cut = tmp_path / "ref", tmp_path / "cut"
    reference = _start(ref_out)

    _kill_at(_start(cut, pause="metrics:3", marker=tmp_path / "m1"), tmp_path / "m1")
    log_text = (cut / "metrics.jsonl").read_text()
    assert log_text.count("\n") == 2 and not log_text.endswith("\n")  # the kill landed inside step 3's append

    _kill_at(_start(cut, "--resume", pause="write:addon", marker=tmp_path / "m2"), tmp_path / "m2")
    assert not (cut / "addon").exists() and list(cut.glob(".addon.*.tmp"))  # inside the final write
    assert _checkpoint_step(cut) == STEPS

    last = _start(cut, "--resume")
    out, _ = last.communicate(timeout=300)
    assert last.returncode == 0, out[-3000:]
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-3000:]
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in ref_out.iterdir())  # no debris, no lock
    manifests = [json.loads((folder / "addon" / "ppcl_addon.json").read_text()) for folder in (ref_out, cut)]
    assert (
        manifests[1]["metrics"]["depth_loss"] == manifests[0]["metrics"]["depth_loss"] != {}
    )  # even with no step left
    want = load_tensors(ref_out / "addon" / WEIGHTS_FILE, "reference")
    got = load_tensors(cut / "addon" / WEIGHTS_FILE, "resumed")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    rows = [json.loads(r) for r in (cut / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(r) for r in (ref_out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(r["step"], r["loss"]) for r in ref_rows]


def test_one_run_per_folder_and_a_killed_runs_lock_is_taken_over_by_resume(tmp_path: Path) -> None:
    """Issue 14: a second run into a folder a live run holds is refused (its files untouched); after a SIGKILL the
    stale lock is taken over by --resume, which completes and leaves no lock behind."""
    out = tmp_path / "run"
    first = _start(out, pause="step:3", marker=tmp_path / "m")
    deadline = time.monotonic() + 240
    while not (tmp_path / "m").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run never reached its pause point"
        time.sleep(0.05)
    lock = json.loads((out / LOCK_FILE).read_text())
    assert lock["pid"] == first.pid
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    second = _start(out, "--resume")
    text, _ = second.communicate(timeout=300)
    assert second.returncode != 0 and "another ppcl run is writing into this folder" in text
    assert f"pid {first.pid}" in text
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    resumed = _start(out, "--resume")
    text, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, text[-3000:]
    assert (out / "addon" / WEIGHTS_FILE).is_file() and not (out / LOCK_FILE).exists()


def _run(out: Path, steps: int = 2, **kwargs: object) -> PruningAddon:
    case = build_tiny("qwenimage")
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    config = DistillConfig(steps=steps, batch_size=2, checkpoint_every=1, log_every=1)

    class Data:
        batch_size = 2

        def batch(self, index: int) -> dict[str, object]:
            return case.make_inputs(index)

    return distill_depth(case.model, addon, Data(), config, out, **kwargs)  # type: ignore[arg-type]


def test_debris_of_killed_writes_is_removed_by_the_next_resume_and_user_files_are_not(tmp_path: Path) -> None:
    """Issue 14 (no debris): temp and old folders of killed add-on / checkpoint writes, nested ones included, go with
    the next --resume; names that only resemble them (a user's) stay."""
    _run(tmp_path, steps=3, stop_at=2)
    debris = [
        ".addon.k1ll3d00.tmp",
        ".addon.k1ll3d01.old",
        "..checkpoint.abcdefgh.tmp.ijklmnop.tmp",
        ".checkpoint.qrstuvwx.tmp",
    ]
    for name in debris:
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("partial")
    mine = [tmp_path / ".addon.notes.txt", tmp_path / ".addon.backup"]
    mine[0].write_text("my notes")
    mine[1].mkdir()
    _run(tmp_path, steps=3, resume=True)
    assert not [n for n in debris if (tmp_path / n).exists()]
    assert mine[0].read_text() == "my notes" and mine[1].is_dir()
    assert (tmp_path / "addon" / WEIGHTS_FILE).is_file()


def test_a_kill_between_the_swap_renames_loses_no_checkpoint(tmp_path: Path) -> None:
    # atomic_folder replaces a checkpoint in two renames (old → .checkpoint.*.old/x, temp → checkpoint); a kill in
    # between leaves no checkpoint/ but a complete old one, which a resume puts back instead of starting afresh.
    _run(tmp_path, steps=2)
    old = tmp_path / ".checkpoint.abc.old"
    old.mkdir()
    os.replace(tmp_path / "checkpoint", old / "x")
    (tmp_path / ".checkpoint.def.tmp").mkdir()  # an unfinished write of the next one
    resumed = _run(tmp_path, steps=3, resume=True)
    assert resumed.provenance["depth"]["steps"] == 3
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # continued from step 2, not restarted
    assert not list(tmp_path.glob(".checkpoint.*"))


def test_unusable_output_folders_fail_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtefactError, match="is a file"):
        _run(blocker / "run")
    # Permissions: patched, because the test may run as root, for whom every folder is writable.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real_access(p, mode))
    with pytest.raises(ArtefactError, match="not writable") as err:
        _run(tmp_path / "ro")
    assert "Fix:" in str(err.value)
    monkeypatch.setattr(os, "access", real_access)
    import ppcl.distill.checkpoint as ckpt

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: SimpleNamespace(free=1000))
    with pytest.raises(ArtefactError, match="not enough free disk space"):
        _run(tmp_path / "full")
    assert not (tmp_path / "full" / "metrics.jsonl").exists()  # nothing trained


def test_nan_gradient_stops_the_run_naming_the_step(tmp_path: Path) -> None:
    case = build_tiny("qwenimage")
    addon = PruningAddon.from_plan(case.model, two_span_plan(case.model))
    handle_box: list[int] = [0]

    def poison(grad: torch.Tensor) -> torch.Tensor:
        handle_box[0] += 1
        return grad * math.nan if handle_box[0] > 2 else grad  # finite losses, NaN gradient from step 3 on

    next(iter(addon.students.parameters())).register_hook(poison)
    config = DistillConfig(steps=4, batch_size=2, checkpoint_every=1, log_every=1)

    class Data:
        batch_size = 2

        def batch(self, index: int) -> dict[str, object]:
            return case.make_inputs(index)

    with pytest.raises(TrainingError, match="gradient norm is not finite at step 3 of 4") as err:
        distill_depth(case.model, addon, Data(), config, tmp_path)  # type: ignore[arg-type]
    assert "last good checkpoint" in str(err.value)
    assert read_trainer_state(tmp_path / "checkpoint")["step"] == 2
