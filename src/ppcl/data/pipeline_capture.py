"""Calibration through a diffusers pipeline: run its own sampling loop, keep the transformer's inputs.

The pipeline's text encoder and scheduler produce exactly the inputs the transformer sees at inference (prompt
embeddings, masks, the scheduler's shifted timesteps, packed latents). Nothing is downloaded: the pipeline object is
built by the caller from local folders.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from ppcl.data.calibration import CalibrationSet, InputCapture
from ppcl.errors import ConfigError
from ppcl.logging import get_logger, progress

log = get_logger("calibrate")


def spread_steps(n_timesteps: int, num_inference_steps: int) -> list[int]:
    """``n_timesteps`` step indices spread evenly over the schedule, first and last step included."""
    if not 1 <= n_timesteps <= num_inference_steps:
        raise ConfigError(
            "number of calibration timesteps out of range",
            expected=f"1..{num_inference_steps} (the number of inference steps)",
            found=str(n_timesteps),
            fix="use fewer timesteps or more inference steps",
        )
    return sorted({int(round(x)) for x in np.linspace(0, num_inference_steps - 1, n_timesteps)})


def calibrate_pipeline(
    pipe: Any,
    prompts: list[str] | None = None,
    seeds: tuple[int, ...] = (0,),
    num_inference_steps: int = 20,
    n_timesteps: int = 6,
    prompt_embeds: list[dict[str, torch.Tensor]] | None = None,
    **call_kwargs: Any,
) -> CalibrationSet:
    """Capture ``pipe.transformer``'s inputs at ``n_timesteps`` steps of real sampling runs.

    Give either ``prompts`` (encoded by the pipeline's own text encoder) or ``prompt_embeds``: one dict of pipeline
    keyword arguments per prompt (e.g. ``{"prompt_embeds": (1, T, D), "prompt_embeds_mask": (1, T)}``), for setups
    without a tokenizer. ``call_kwargs`` go to every pipeline call (height, width, guidance, ...).
    """
    if not prompts and not prompt_embeds:
        raise ConfigError(
            "no prompts to calibrate on",
            expected="a non-empty prompt list",
            found="none",
            fix="pass --prompts FILE with one prompt per line",
        )
    per_prompt: list[dict[str, Any]] = [{"prompt": p} for p in prompts] if prompts else list(prompt_embeds or [])
    steps = set(spread_steps(n_timesteps, num_inference_steps))
    capture = InputCapture(pipe.transformer, lambda s: s in steps)

    def on_step_end(_pipe: Any, i: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        capture.set_step(i + 1)
        return callback_kwargs

    # Pipelines without a step callback (HunyuanVideo-1.5) are followed through their scheduler's steps instead.
    with_callback = call_takes(pipe, "callback_on_step_end")
    callback = {"callback_on_step_end": on_step_end} if with_callback else {}
    counting = nullcontext() if with_callback else _counting_scheduler_steps(pipe.scheduler, capture)

    runs = [(seed, kwargs) for seed in seeds for kwargs in per_prompt]
    log.info(
        "calibrate: %d prompts x %d seeds, steps %s of %d",
        len(per_prompt),
        len(seeds),
        sorted(steps),
        num_inference_steps,
    )
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # ours counts whole runs; the pipeline's would nest per step
    with capture.active(), counting:
        for seed, kwargs in progress(runs, desc="calibrate", total=len(runs)):
            capture.set_step(0)
            pipe(
                **kwargs,
                **call_kwargs,
                num_inference_steps=num_inference_steps,
                output_type="latent",
                generator=torch.Generator("cpu").manual_seed(seed),
                **callback,
            )
    meta = {
        "source": "pipeline",
        "pipeline_class": type(pipe).__name__,
        "prompts": prompts or [],
        "seeds": list(seeds),
        "num_inference_steps": num_inference_steps,
        "kept_steps": sorted(steps),
        "call_kwargs": {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str, bool))},
    }
    return capture.to_calibration_set(meta)


def call_takes(pipeline: Any, argument: str) -> bool:
    """Whether a pipeline (instance or class) has ``argument`` in its ``__call__``."""
    return argument in inspect.signature(pipeline.__call__).parameters


def guidance_kwargs(pipe: Any, guidance: float | None, negative_prompt: str | None) -> dict[str, Any]:
    """Pipeline call arguments for a guidance scale and a negative prompt, the family's way: the scale under its
    ``cfg_argument`` (Qwen-Image: ``true_cfg_scale``), and, when guidance > 1 is asked for without a negative
    prompt, the family's default one where its CFG needs it (Qwen-Image: ``" "``). ``None`` keeps the pipeline's.

    Raises:
        ConfigError: a negative prompt for a pipeline whose call takes none.
    """
    from ppcl.arch import get_spec

    spec = get_spec(pipe.transformer)
    out: dict[str, Any] = {} if guidance is None else {spec.cfg_argument: guidance}
    if negative_prompt is None and guidance is not None and guidance > 1:
        negative_prompt = spec.negative_prompt_default
        if negative_prompt is not None:
            log.info("guidance %s: negative prompt %r (the family's default; --negative-prompt sets another)",
                     guidance, negative_prompt)  # fmt: skip
    if negative_prompt is not None:
        if not call_takes(pipe, "negative_prompt"):
            raise ConfigError(
                f"{type(pipe).__name__} takes no negative prompt",
                expected="a pipeline whose call has `negative_prompt`",
                found=type(pipe).__name__,
                fix="drop --negative-prompt",
            )
        out["negative_prompt"] = negative_prompt
    return out


@contextmanager
def _counting_scheduler_steps(scheduler: Any, capture: InputCapture) -> Iterator[None]:
    """While active, every ``scheduler.step`` call advances ``capture`` to the next denoising step (the step the next
    transformer calls belong to), as a pipeline's ``callback_on_step_end`` would; each run starts at step 0 by
    ``capture.set_step(0)``. The scheduler's own ``step`` shows through again afterwards."""
    original = scheduler.step

    def step(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        capture.set_step(capture.step + 1)
        return out

    scheduler.step = step
    try:
        yield
    finally:
        del scheduler.step  # the instance attribute set above
