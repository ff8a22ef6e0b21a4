"""Calibration of the toy teacher: ShapesWorld prompts sampled with the toy sampler, inputs captured on the way."""

from __future__ import annotations

import numpy as np

from ppcl.data.calibration import CalibrationSet, InputCapture
from ppcl.errors import ConfigError
from ppcl.logging import get_logger
from ppcl.toy.sampler import SamplerConfig, sample
from ppcl.toy.teacher import ToyTeacher
from ppcl.toy.world import random_scene

log = get_logger("toy.calibrate")


def calibration_prompts(n: int, seed: int) -> list[str]:
    """``n`` ShapesWorld captions drawn from the training distribution with ``seed`` (not the benchmark prompts)."""
    rng = np.random.default_rng([seed, 0xCA1])
    return [random_scene(rng).caption for _ in range(n)]


def kept_steps(n_timesteps: int, sampler_steps: int) -> list[int]:
    """``n_timesteps`` step indices spread evenly over a ``sampler_steps``-step schedule, first and last included."""
    if not 1 <= n_timesteps <= sampler_steps:
        raise ConfigError(
            "number of calibration timesteps out of range",
            expected=f"1..{sampler_steps} (the sampler's steps)",
            found=str(n_timesteps),
            fix="use fewer timesteps or more sampler steps",
        )
    return sorted({int(round(x)) for x in np.linspace(0, sampler_steps - 1, n_timesteps)})


def calibrate_toy(
    teacher: ToyTeacher,
    num_prompts: int = 32,
    seeds: tuple[int, ...] = (0,),
    n_timesteps: int = 6,
    sampler: SamplerConfig = SamplerConfig(),
    prompt_seed: int = 0,
) -> CalibrationSet:
    """Capture the toy teacher's inputs at ``n_timesteps`` steps of real CFG sampling runs on ShapesWorld prompts.

    Each kept step contributes the conditional and the unconditional half of the guided batch, exactly what the
    transformer sees at inference. Returns ``num_prompts * len(seeds) * n_timesteps * 2`` samples.
    """
    if num_prompts < 1:
        raise ConfigError(
            "empty calibration request",
            expected="at least one prompt",
            found=f"{num_prompts} prompts",
            fix="pass --num-prompts >= 1",
        )
    return calibrate_toy_prompts(teacher, calibration_prompts(num_prompts, prompt_seed), seeds, n_timesteps, sampler)


def calibrate_toy_prompts(
    teacher: ToyTeacher,
    prompts: list[str],
    seeds: tuple[int, ...] = (0,),
    n_timesteps: int = 6,
    sampler: SamplerConfig = SamplerConfig(),
) -> CalibrationSet:
    """:func:`calibrate_toy` on given captions."""
    if not prompts or not seeds:
        raise ConfigError(
            "empty calibration request",
            expected="at least one prompt and one seed",
            found=f"{len(prompts)} prompts, seeds {list(seeds)}",
            fix="pass prompts and --seeds",
        )
    for prompt in prompts:
        teacher.tokenizer.encode_one(prompt)  # reject unknown words before sampling
    steps = set(kept_steps(n_timesteps, sampler.steps))
    capture = InputCapture(teacher.transformer, lambda s: s in steps)
    rows = [p for _ in seeds for p in prompts]
    noise_seeds = [s * 100_000 + 50_000 + i for s in seeds for i in range(len(prompts))]
    log.info("calibrate: %d prompts x %d seeds, steps %s of %d", len(prompts), len(seeds), sorted(steps), sampler.steps)
    with capture.active():
        sample(teacher, rows, noise_seeds, sampler, on_step=capture.set_step)
    grid = np.linspace(1.0, 0.0, sampler.steps + 1)
    meta = {
        "source": "toy",
        "prompts": prompts,
        "seeds": list(seeds),
        "noise_seeds": noise_seeds,
        "sampler": {"steps": sampler.steps, "guidance": sampler.guidance},
        "timesteps": [round(float(grid[s]), 6) for s in sorted(steps)],
        "cfg_halves": ["cond", "uncond"],
    }
    return capture.to_calibration_set(meta)
