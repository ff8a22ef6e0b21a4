"""Seeded, bounded fuzzing of every artefact kind ppcl reads (issue 14): random truncations and byte flips of each file
a loader reads; every load must either raise a :class:`~ppcl.errors.PPCLError` or return content that passed its
checks. Any other exception is a bug (a traceback a user would see); a load taking longer than :data:`LIMIT_S`
fails the test (a hang, or work growing with a corrupt size field), and so does one whose peak resident memory grows
by more than :data:`MEMORY_LIMIT_MB` (an allocation sized by a corrupt field; measured with Linux's resettable peak,
``/proc/self/clear_refs``).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ppcl.addon import PruningAddon
from ppcl.analysis import AnalysisConfig, RedundancyReport, analyze
from ppcl.arch import get_spec
from ppcl.data.calibration import CalibrationSet, assemble
from ppcl.distill.run_folder import read_trainer_state
from ppcl.distill.trainer import DistillConfig, distill_depth
from ppcl.errors import PPCLError
from ppcl.plan import PruningPlan
from ppcl.runtime import merge
from ppcl.runtime.merge_width import MERGED_FILE, load_merged
from tiny_models import build_tiny, two_span_plan

MUTATIONS = 24  # per file; seeded, so a failure reproduces
LIMIT_S = 30
MEMORY_LIMIT_MB = 256  # every intact artefact here loads in a few MB


def _memory_kb() -> tuple[int, int]:
    """(peak, current) resident memory of this process in kB, from ``/proc/self/status``."""
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) for key in ("VmHWM", "VmRSS"))  # type: ignore


@contextmanager
def memory_limit(megabytes: int) -> Iterator[None]:
    """Fail when the peak resident memory grows by more than ``megabytes`` inside the block."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _memory_kb()[1]
    try:
        yield
    finally:  # also when the load raised: it may have allocated first
        grown = (_memory_kb()[0] - before) / 1024
        assert grown < megabytes, f"a load grew the peak resident memory by {grown:.0f} MB"


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"a load took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A truncation (half of the draws) or 1-8 flipped bytes."""
    if not data:
        return b"x"
    if rng.random() < 0.5:
        return data[: rng.randrange(len(data))]
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= rng.randint(1, 255)
    return bytes(out)


class Data:
    batch_size = 2

    def __init__(self, case: Any) -> None:
        self.case = case

    def batch(self, index: int) -> dict[str, Any]:
        return self.case.make_inputs(index)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str], Callable[[Path], Any]]]:
    """kind → (a valid folder, the files its loader reads, the loader)."""
    root = tmp_path_factory.mktemp("fuzz")
    case = build_tiny("qwenimage")
    model = case.model
    plan = two_span_plan(model)
    calibration = assemble(get_spec(model), model, [case.make_inputs(s) for s in range(2)], {"source": "test"})
    calibration.save(root / "calibration")
    analyze(model, calibration, AnalysisConfig(batch_size=4, protect_first=1, protect_last=1)).save(root / "report")
    plan.save(root / "plan")
    addon = PruningAddon.from_plan(model, plan)
    addon.save_pretrained(root / "addon")
    distill_depth(
        model,
        addon,
        Data(case),
        DistillConfig(steps=2, batch_size=2, checkpoint_every=1, log_every=1),
        root / "run",
        stop_at=1,
    )
    merged = root / "merged"
    merge(model, PruningAddon.from_plan(model, plan), "a").save_pretrained(str(merged))
    record = {
        "format": "ppcl.merged_width",
        "format_version": 1,
        "model_class": type(model).__name__,
        "level": "a",
        "substitutions": [],
        "projection_dtype": "float32",
    }
    (merged / MERGED_FILE).write_text(json.dumps(record))

    def load_checkpoint(folder: Path) -> Any:
        state = read_trainer_state(folder)
        return state, PruningAddon.from_pretrained(folder, model)

    return {
        "plan": (root / "plan", ["plan.json"], PruningPlan.load),
        "report": (root / "report", ["report.json", "report.safetensors"], RedundancyReport.load),
        "calibration": (root / "calibration", ["calibration.json", "calibration.safetensors"], CalibrationSet.load),
        "add-on": (
            root / "addon",
            ["ppcl_addon.json", "ppcl_addon.safetensors"],
            lambda f: PruningAddon.from_pretrained(f, model),
        ),
        "trainer state": (
            root / "run" / "checkpoint",
            ["trainer_state.json", "trainer_state.safetensors", "ppcl_addon.json", "ppcl_addon.safetensors"],
            load_checkpoint,
        ),
        "merged model record": (merged, [MERGED_FILE], load_merged),
        "latent cache": (
            _latent_cache(root),
            ["manifest.json", "shard_00000.safetensors", "empty_prompt.safetensors"],
            _load_cache,
        ),
    }


def _latent_cache(root: Path) -> Path:
    """A two-image latent cache of the tiny FLUX.1 pipeline."""
    import numpy as np
    from PIL import Image

    import ppcl
    from ppcl.data.images import scan_folder
    from ppcl.data.latent_build import build_image_cache
    from tiny_pipelines import build_flux

    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text("a red circle on the grass\n")
    pipe = ppcl.load_pipeline(build_flux(root / "flux"))
    return build_image_cache(pipe, scan_folder(images), root / "cache", 16)


def _load_cache(folder: Path) -> Any:
    from ppcl.data.latent_cache import LatentCache

    cache = LatentCache(folder)
    cache.verify()
    return cache.read(0, [0])


@pytest.mark.parametrize(
    "kind", ["plan", "report", "calibration", "add-on", "trainer state", "merged model record", "latent cache"]
)
def test_corrupt_artefacts_fail_cleanly(artefacts: dict, tmp_path: Path, kind: str) -> None:
    folder, files, load = artefacts[kind]
    load(folder)  # the intact artefact loads
    rng = random.Random(f"{kind}-1234")
    outcomes = {"PPCLError": 0, "loaded": 0}
    for name in files:
        original = (folder / name).read_bytes()
        for i in range(MUTATIONS):
            broken = tmp_path / f"{name}-{i}"
            shutil.copytree(folder, broken)
            (broken / name).write_bytes(mutate(original, rng))
            try:
                with time_limit(LIMIT_S), memory_limit(MEMORY_LIMIT_MB):
                    load(broken)
            except PPCLError:
                outcomes["PPCLError"] += 1
            else:
                outcomes["loaded"] += 1  # a flip in a value the checks accept (a float digit, a name letter)
            shutil.rmtree(broken)
    assert outcomes["PPCLError"] > 0, outcomes  # the corruptions are real: most must be caught
    assert sum(outcomes.values()) == MUTATIONS * len(files)


def test_the_memory_limit_catches_a_large_allocation() -> None:
    with pytest.raises(AssertionError, match="grew the peak resident memory"), memory_limit(64):
        block = bytearray(200 * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
    with memory_limit(64):
        bytearray(2**20)


def test_mutations_are_seeded_and_change_the_bytes() -> None:
    data = bytes(range(256)) * 4
    assert mutate(data, random.Random(7)) == mutate(data, random.Random(7))
    assert all(mutate(data, random.Random(seed)) != data for seed in range(50))
