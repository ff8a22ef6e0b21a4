"""The run folder of a training stage: its layout and the output rules of :mod:`ppcl.outputs` applied to it.

Layout of ``out_dir``::

    ppcl_output.json   marks the folder as a ppcl distillation run (written when the run starts)
    metrics.jsonl      one row per logged step: step, loss (total and per span / term), lr, seconds
    checkpoint/        the latest checkpoint: a valid add-on folder + trainer_state.json/.safetensors (optimiser,
                       scheduler and RNG states; nothing pickled) (+ trained_base.safetensors,
                       the base blocks a full fine-tune trains), written atomically
    addon/             the final add-on (written when the run reaches ``config.steps``)

A folder is a run when it carries the marker, or (runs from before the marker) ``metrics.jsonl`` or a checkpoint's
trainer state. A run in progress continues only with ``resume``; a run is started again from scratch only with
``overwrite``, which removes the run's own entries above and nothing else.

One run per folder: a running stage holds ``.ppcl-run.lock`` (its pid, host and start time), created exclusively.
A second run into the folder is refused while the holder lives; a lock whose process is gone (a SIGKILL) is stale and
taken over by the next run the folder rules allow (``--resume``). A lock from another host cannot be checked and is
treated as live (the message says how to remove it).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch

from ppcl.distill.checkpoint import recover_checkpoint
from ppcl.errors import ArtefactError, ConfigError
from ppcl.faults import fault_point, pausing_at
from ppcl.io import WRITE_ERRNOS, load_state, remove_debris, write_text
from ppcl.logging import get_logger
from ppcl.outputs import DISTILL_RUN, OUTPUT_MARKER, is_kind, write_marker

log = get_logger("distill.run_folder")

CHECKPOINT_DIR = "checkpoint"
ADDON_DIR = "addon"
STATE_NAME = "trainer_state"  # trainer_state.json + trainer_state.safetensors (ppcl.io.save_state): no pickle
STATE_FILE = f"{STATE_NAME}.json"
LEGACY_STATE_FILE = "trainer_state.pt"  # before issue 14 (torch.save); still read, once, with a deprecation note
EXTRA_FILE = "trained_base.safetensors"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".ppcl-run.lock"
RUN_ENTRIES = (METRICS_FILE, CHECKPOINT_DIR, ADDON_DIR, OUTPUT_MARKER)


def is_run_folder(out: Path) -> bool:
    """True when ``out`` is a ppcl run folder (marker, metrics log or checkpoint state)."""
    return is_kind(out, DISTILL_RUN) or has_trainer_state(out / CHECKPOINT_DIR)


def has_trainer_state(checkpoint: Path) -> bool:
    """True when the checkpoint folder holds a trainer state (current or legacy format)."""
    return (checkpoint / STATE_FILE).is_file() or (checkpoint / LEGACY_STATE_FILE).is_file()


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> bool:
    """Check ``out`` before a stage writes into it (read-only, so every process of a multi-process run may call it);
    returns whether the run in it must be cleared first (``overwrite`` without ``resume``).

    Raises:
        ConfigError: ``out`` or one of the run's own entries is a symlink, ``out`` holds files that are not a ppcl
            run (never deleted), or holds a run and neither ``resume`` nor ``overwrite`` is given.
    """
    if out.is_symlink():
        raise ConfigError(
            "the run folder is a symlink",
            expected="a new, empty or ppcl run folder",
            found=f"{out} -> {out.readlink()}",
            fix="pass the real folder as --out",
        )
    if not (out.is_dir() and any(out.iterdir())):
        return False
    _refuse_symlinks(out)
    if not is_run_folder(out):
        raise ConfigError(
            "the output folder holds files that are not a ppcl run",
            expected="a new, empty or ppcl run folder",
            found=f"{out} is not empty",
            fix="choose another --out (ppcl does not delete what it did not create)",
        )
    if resume:
        return False
    if not overwrite:
        raise ConfigError(
            "the output folder already holds a distillation run",
            expected="a new folder, --resume to continue it or --overwrite to start again",
            found=str(out),
            fix="pass --resume (resume=True) or --overwrite (overwrite=True), or choose another out_dir",
        )
    return True


def _refuse_symlinks(out: Path) -> None:
    """Refuse a run whose own entries (or what is inside its checkpoint / add-on) are symlinks: ppcl never makes
    them, and a run reads, appends to and replaces these paths, so it would read or rewrite whatever they point to."""
    entries = [out / name for name in RUN_ENTRIES]
    entries += [
        p
        for name in (CHECKPOINT_DIR, ADDON_DIR)
        if (out / name).is_dir() and not (out / name).is_symlink()
        for p in (out / name).iterdir()
    ]
    linked = [p for p in entries if p.is_symlink()]
    if linked:
        raise ConfigError(
            "the run folder holds a symlink ppcl did not create",
            expected="plain files and folders written by ppcl",
            found=", ".join(f"{p} -> {p.readlink()}" for p in linked),
            fix="replace the symlink by the real file or folder, or choose another --out",
        )


def claim_run_folder(out: Path, clear: bool) -> None:
    """Take ``out`` for this run (main process): lock it, clear the previous run when ``clear`` (see
    :func:`check_run_folder`), mark it, put back a checkpoint an interrupted swap left aside, and drop the debris of
    killed writes. The lock is released again if any of that fails."""
    acquire_lock(out)
    try:
        if clear:
            _clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / OUTPUT_MARKER).is_file():
            write_marker(out, DISTILL_RUN)
        recover_checkpoint(out / CHECKPOINT_DIR)  # before the debris: an interrupted swap's .old may be the only copy
        for name in (CHECKPOINT_DIR, ADDON_DIR):
            remove_debris(out / name)
    except BaseException:  # re-raised: only the lock is undone
        release_lock(out)
        raise


def _clear_run(out: Path) -> None:
    """Remove the entries a run writes (and the temp/old siblings of its atomic folders); nothing else."""
    for name in RUN_ENTRIES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for name in (CHECKPOINT_DIR, ADDON_DIR):
        remove_debris(out / name)  # only ppcl's exact temp names


def check_lock(out: Path) -> None:
    """Refuse ``out`` while another live run holds its lock (read-only: every process may call it).

    Raises:
        ConfigError: naming the holder's pid, host and start time.
    """
    holder = _holder(out)
    if holder is not None and _alive(holder):
        raise ConfigError(
            "another ppcl run is writing into this folder",
            expected="one run per output folder",
            found=f"{out / LOCK_FILE}: pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')}",
            fix="wait for that run to end or choose another --out; if it ran on another machine and "
            f"is gone, remove {out / LOCK_FILE}",
        )


def acquire_lock(out: Path) -> None:
    """Create the lock exclusively for this process; a stale lock (its process is gone) is taken over.

    Raises:
        ConfigError: a live run holds the lock (see :func:`check_lock`).
    """
    path = out / LOCK_FILE
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            check_lock(out)
            if attempt == 0:
                log.warning("taking over the stale lock %s (its process is gone: %s)", path, _holder(out))
                path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        return
    check_lock(out)  # lost a race for a stale lock to a live run


def release_lock(out: Path) -> None:
    """Remove the lock if this process holds it (never another run's)."""
    holder = _holder(out)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        (out / LOCK_FILE).unlink(missing_ok=True)


def _holder(out: Path) -> dict[str, Any] | None:
    path = out / LOCK_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        # A lock cut short by a kill between create and write: its process died with it.
        return {"pid": None, "host": socket.gethostname(), "started": "unknown (unreadable lock)"}
    return data if isinstance(data, dict) else {"pid": None, "host": socket.gethostname(), "started": "unknown"}


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's process may still run: unknown hosts count as alive, a missing pid as dead."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return False  # this very process holds a lock left by an earlier session of its own: stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of ``checkpoint`` (current format, else the legacy pickle-based file read with
    ``weights_only=True`` and a deprecation note; the next checkpoint is written in the current format).

    Raises:
        ArtefactError: the state is truncated, foreign or incomplete.
    """
    if (checkpoint / STATE_FILE).is_file():
        return _checked(load_state(checkpoint, STATE_NAME, "trainer state"), checkpoint / STATE_FILE)
    log.warning(
        "%s is in the pre-issue-14 format (torch.save); it is read once and the next checkpoint replaces it "
        "with trainer_state.json + .safetensors. Support for reading it will be removed.",
        checkpoint / LEGACY_STATE_FILE,
    )
    try:
        state = torch.load(checkpoint / LEGACY_STATE_FILE, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ArtefactError(
            "the legacy trainer state is unreadable",
            expected="a complete trainer_state.pt",
            found=f"{checkpoint / LEGACY_STATE_FILE}: {type(exc).__name__}: {exc}",
            fix="start the run again (--overwrite)",
        ) from exc
    return _checked(state, checkpoint / LEGACY_STATE_FILE)


STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "step": int,
    "data_index": int,
    "elapsed": (int, float),
    "config": dict,
    "optimizer": dict,
    "scheduler": dict,
    "rng": dict,
}


def _checked(state: Any, path: Path) -> dict[str, Any]:
    """``state`` after checking it has the fields a resume reads, of the right types."""
    if not isinstance(state, dict):
        state, bad = {"step": 0, "data_index": 0}, ["the state itself"]
    else:
        bad = [
            k
            for k, kind in STATE_FIELDS.items()
            if not isinstance(state.get(k), kind) or isinstance(state.get(k), bool)
        ]
    if not bad:
        opt = state["optimizer"]
        bad = [] if isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list) else ["optimizer"]
    if bad or state["step"] < 0 or state["data_index"] < 0:
        raise ArtefactError(
            "the trainer state is incomplete",
            expected=f"the fields {sorted(STATE_FIELDS)}",
            found=f"{path}: missing or malformed {bad or ['step / data_index']}",
            fix="start the run again (--overwrite); the checkpoint was edited or damaged",
        )
    return state


def metrics_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a cut-short last line (a kill during the append) is dropped with a warning.

    Raises:
        ArtefactError: a line before the last is not a JSON row with a step (the file was edited or damaged).
    """
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = row["step"] if isinstance(row, dict) else None
        except (json.JSONDecodeError, KeyError):
            step = None
        if isinstance(step, int):
            rows.append(row)
        elif i == len(lines) - 1:
            log.warning("dropping the cut-short last line of %s (a kill during its append): %r", path, line[:80])
        else:
            raise ArtefactError(
                "the metrics log is damaged",
                expected="one JSON row with a step per line",
                found=f"{path} line {i + 1}: {line[:80]!r}",
                fix="remove the damaged line, or start the run again (--overwrite)",
            )
    return rows


def append_metrics_row(out: Path, row: dict[str, Any]) -> None:
    """Append one row to ``out/metrics.jsonl``. A kill during the append leaves a cut-short last line, which
    :func:`metrics_rows` drops on resume; a full disk or read-only folder is an :class:`ArtefactError`."""
    line = json.dumps(row) + "\n"
    path = out / METRICS_FILE
    try:
        with path.open("a", encoding="utf-8") as handle:
            if pausing_at("metrics", row["step"]):  # the SIGKILL test's cut-short append
                handle.write(line[: len(line) // 2])
                handle.flush()
                fault_point("metrics", row["step"])
            handle.write(line)
    except OSError as exc:
        raise _metrics_write_error(path, exc) from exc


def keep_metrics_rows(out: Path, last_step: int) -> None:
    """Rewrite ``out/metrics.jsonl`` keeping the rows up to ``last_step`` (a resumed run logs the later ones again);
    atomic (:func:`ppcl.io.write_text`)."""
    path = out / METRICS_FILE
    write_text("".join(json.dumps(r) + "\n" for r in metrics_rows(path) if r["step"] <= last_step), path)


def _metrics_write_error(path: Path, exc: OSError) -> ArtefactError:
    if exc.errno not in WRITE_ERRNOS:
        raise exc
    return ArtefactError(
        "cannot write the metrics log",
        expected="a writable run folder with free space",
        found=f"{path}: {exc.strerror or exc}",
        fix="free some space or fix the permissions, then "
        "--resume (the last checkpoint is intact; a cut-short last line is dropped)",
    )
