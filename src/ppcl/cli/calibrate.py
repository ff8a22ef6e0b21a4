"""``ppcl calibrate``: capture the transformer's inputs from sampling runs into a CalibrationSet."""

from __future__ import annotations

import argparse
from pathlib import Path

from ppcl.cli.common import (
    SEED_LIMIT,
    add_overwrite_arg,
    add_quantize_arg,
    check_device,
    check_out,
    require_positive,
)
from ppcl.data.loading import DTYPE_CHOICES
from ppcl.errors import ConfigError
from ppcl.logging import get_logger

log = get_logger("cli.calibrate")


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("calibrate", help="capture calibration inputs (toy teacher or a local pipeline)")
    p.add_argument("--out", required=True, help="output folder (CalibrationSet)")
    p.add_argument(
        "--pipeline",
        default=None,
        help="diffusers pipeline folder or a Hub id in the local cache (default: the toy world)",
    )
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (pipelines; toy: optional)")
    p.add_argument("--num-prompts", type=int, default=32, help="toy: ShapesWorld prompts to draw")
    p.add_argument("--seeds", default="0", help="comma-separated noise seeds")
    p.add_argument("--timesteps", type=int, default=6, help="denoising steps kept per run, spread over the schedule")
    p.add_argument("--steps", type=int, default=20, help="sampling steps per run")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale (toy: default 4; pipelines: guidance_scale, Qwen-Image: true_cfg_scale, default the "
        "pipeline's own)",
    )
    p.add_argument(
        "--negative-prompt",
        default=None,
        help="pipelines: negative prompt of the unconditional calls (Qwen-Image: ' ' when --guidance > 1 and none)",
    )
    p.add_argument("--height", type=int, default=None, help="pipelines: image height")
    p.add_argument("--width", type=int, default=None, help="pipelines: image width")
    p.add_argument(
        "--num-frames", type=int, default=None, help="video pipelines (Wan, HunyuanVideo-1.5): frames per clip"
    )
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="pipelines: torch dtype")
    add_quantize_arg(p)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    add_overwrite_arg(p)
    p.set_defaults(func=_run)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as exc:
        raise ConfigError(
            "cannot parse --seeds", expected="comma-separated integers", found=text, fix="pass e.g. --seeds 0,1"
        ) from exc
    if not seeds:
        raise ConfigError("no seeds given", expected="at least one seed", found=repr(text), fix="pass e.g. --seeds 0")
    bad = [s for s in seeds if not 0 <= s < SEED_LIMIT]
    if bad:
        raise ConfigError(
            "--seeds out of range",
            expected=f"seeds in [0, {SEED_LIMIT - 1}]",
            found=str(bad),
            fix="pass e.g. --seeds 0,1",
        )
    return seeds


def _read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError("prompt file not found", expected="a text file, one prompt per line", found=path)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "the prompt file is not UTF-8 text",
            expected="a UTF-8 text file, one prompt per line",
            found=f"{path}: byte {exc.start} is {exc.object[exc.start : exc.start + 1]!r}",
            fix="save the file as UTF-8",
        ) from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(
            "prompt file is empty",
            expected="one prompt per line",
            found=f"no prompts in {path}",
            fix="add prompts to the file",
        )
    return prompts


def _run(args: argparse.Namespace) -> int:
    from ppcl.outputs import CALIBRATION

    check_out(args, CALIBRATION, args.pipeline, args.prompts)
    check_device(args.device)
    require_positive(args, "num_prompts", "timesteps", "steps", "height", "width", "num_frames")
    seeds = _seeds(args.seeds)
    if args.pipeline is None:
        calib = _toy(args, seeds)
    else:
        calib = _pipeline(args, seeds)
    calib.save(args.out, overwrite=args.overwrite)
    log.info("calibrate: %d samples → %s (content %s)", len(calib), args.out, calib.content_hash[:12])
    print(args.out)
    return 0


def _toy(args: argparse.Namespace, seeds: tuple[int, ...]):
    from ppcl.toy.calibrate import calibrate_toy
    from ppcl.toy.sampler import SamplerConfig
    from ppcl.toy.teacher import ToyTeacher

    toy_only = (args.negative_prompt, args.num_frames, args.gguf)
    if any(v is not None for v in toy_only) or args.quantize != "none":
        raise ConfigError(
            "--negative-prompt, --num-frames, --quantize and --gguf do not apply to the toy world",
            expected="--pipeline with a diffusers pipeline",
            found="the toy",
            fix="drop them (the toy's unconditional branch is the empty prompt)",
        )
    prompts = _read_prompts(args.prompts) if args.prompts is not None else None  # fail before loading anything
    teacher = ToyTeacher.load()
    sampler = SamplerConfig(steps=args.steps, guidance=4.0 if args.guidance is None else args.guidance)
    if prompts is not None:
        from ppcl.toy.calibrate import calibrate_toy_prompts

        return calibrate_toy_prompts(teacher, prompts, seeds, args.timesteps, sampler)
    return calibrate_toy(teacher, args.num_prompts, seeds, args.timesteps, sampler)


def _pipeline(args: argparse.Namespace, seeds: tuple[int, ...]):
    from ppcl.data.loading import load_pipeline_folder, parse_dtype, pipeline_class
    from ppcl.data.pipeline_capture import calibrate_pipeline, guidance_kwargs

    if args.prompts is None:
        raise ConfigError(
            "--prompts is required with --pipeline",
            expected="a prompt file",
            found="none",
            fix="pass --prompts prompts.txt",
        )
    prompts = _read_prompts(args.prompts)
    extra = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    if args.num_frames is not None:  # checked on the folder's class, before minutes of loading
        _check_takes(pipeline_class(args.pipeline), "num_frames", "--num-frames")
        extra["num_frames"] = args.num_frames
    pipe = load_pipeline_folder(args.pipeline, parse_dtype(args.dtype), quantize=args.quantize, gguf=args.gguf)
    pipe = pipe.to(args.device)
    extra.update(guidance_kwargs(pipe, args.guidance, args.negative_prompt))
    return calibrate_pipeline(pipe, prompts, seeds, args.steps, args.timesteps, **extra)


def _check_takes(pipeline_cls: type, argument: str, flag: str) -> None:
    """Refuse a flag the pipeline's ``__call__`` has no argument for (it would be ignored or crash mid-run)."""
    from ppcl.data.pipeline_capture import call_takes

    if not call_takes(pipeline_cls, argument):
        raise ConfigError(
            f"{flag} does not apply to {pipeline_cls.__name__}",
            expected=f"a pipeline whose call takes `{argument}` (a video pipeline)",
            found=pipeline_cls.__name__,
            fix=f"drop {flag}",
        )
