"""``ppcl generate``: one image from a pipeline with an add-on level or a merged model plugged in.

``--pipeline`` is a local diffusers pipeline folder (Qwen-Image, FLUX.1, SD3) or omitted for the toy world; ``--addon``
is an add-on folder (needs ``--level``) or a merged-model folder from ``ppcl merge`` (no ``--level``). Everything goes
through :func:`ppcl.load_pipeline`, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from ppcl.cli.common import (
    add_overwrite_arg,
    add_quantize_arg,
    check_device,
    check_out,
    require_positive,
    require_seed,
)
from ppcl.data.loading import DTYPE_CHOICES
from ppcl.errors import ConfigError
from ppcl.logging import get_logger

log = get_logger("cli.generate")


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("generate", help="sample one image with an add-on level or a merged model")
    p.add_argument(
        "--pipeline",
        default=None,
        help="diffusers pipeline folder or a Hub id in the local cache (default: the toy world)",
    )
    p.add_argument(
        "--addon",
        default=None,
        help="add-on folder (with --level) or merged-model folder (ppcl merge); or a Hub id in the local cache",
    )
    p.add_argument("--level", default=None, help="add-on level to activate")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--out", required=True, help="output image file (.png)")
    p.add_argument("--steps", type=int, default=28, help="sampling steps")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale (pipelines: guidance_scale, Qwen-Image: true_cfg_scale; default: the pipeline's own)",
    )
    p.add_argument(
        "--negative-prompt",
        default=None,
        help="pipelines: negative prompt (Qwen-Image: ' ' when --guidance > 1 and none, so its true CFG runs)",
    )
    p.add_argument("--height", type=int, default=None, help="pipelines: image height")
    p.add_argument("--width", type=int, default=None, help="pipelines: image width")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="torch dtype")
    add_quantize_arg(p)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    add_overwrite_arg(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:

    require_positive(args, "steps", "height", "width")
    require_seed(args, "seed")
    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ConfigError(
            "unknown image format",
            expected="--out ending in .png, .jpg or .webp",
            found=args.out,
            fix="pass e.g. --out img.png",
        )
    from ppcl.outputs import IMAGE

    check_out(args, IMAGE, args.pipeline, args.addon)
    check_device(args.device)
    pipe = _load(args)
    image = _toy_image(pipe, args) if args.pipeline is None else _pipeline_image(pipe, args)
    _save_image(image, Path(args.out))
    log.info("generate: %r → %s", args.prompt, args.out)
    print(args.out)
    return 0


def _toy_image(pipe: Any, args: argparse.Namespace) -> np.ndarray:
    """uint8 ``(H, W, 3)`` from the toy pipeline (its guidance default applies unless ``--guidance``)."""
    if args.negative_prompt is not None:
        raise ConfigError(
            "--negative-prompt does not apply to the toy world",
            expected="--pipeline with a diffusers pipeline",
            found="the toy",
            fix="drop --negative-prompt (the toy's unconditional branch is the empty prompt)",
        )
    kwargs = {"guidance": args.guidance} if args.guidance is not None else {}
    pipe.transformer.to(args.device)
    return pipe([args.prompt], seeds=args.seed, steps=args.steps, **kwargs)[0]


def _pipeline_image(pipe: Any, args: argparse.Namespace) -> np.ndarray:
    """uint8 ``(H, W, 3)`` from a diffusers pipeline run with its own scheduler and sampling loop."""
    import torch

    pipe = pipe.to(args.device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=os.environ.get("PPCL_NO_PROGRESS") == "1")
    kwargs: dict[str, Any] = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    from ppcl.data.pipeline_capture import guidance_kwargs

    kwargs.update(guidance_kwargs(pipe, args.guidance, args.negative_prompt))  # Qwen-Image: true_cfg_scale
    if getattr(pipe, "text_encoder", None) is None:
        # A folder saved for calibration from prompt embeddings cannot turn --prompt into embeddings.
        raise ConfigError(
            "this pipeline folder has no text encoder",
            expected="a pipeline saved with its text encoder",
            found=f"{args.pipeline} without text_encoder",
            fix="use the full pipeline folder, or ppcl.load_pipeline(...) with prompt_embeds in Python",
        )
    out = pipe(
        prompt=args.prompt,
        num_inference_steps=args.steps,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(args.seed),
        **kwargs,
    )
    image = np.asarray(out.images[0])
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def _save_image(image: np.ndarray, path: Path) -> None:
    """Write ``image`` atomically (temp file in the same folder, then rename), so no half-written file remains."""
    from PIL import Image

    from ppcl.io import atomic_file

    with atomic_file(path) as tmp:
        Image.fromarray(image).save(tmp)


def _load(args: argparse.Namespace) -> Any:
    """The pipeline to sample from; ``--quantize`` / ``--gguf`` load the base transformer quantised (an add-on
    applies to it)."""
    import ppcl
    from ppcl.data.loading import load_transformer, parse_dtype, pipeline_quantization
    from ppcl.pipeline import artefact_kind

    dtype = parse_dtype(args.dtype)
    if args.quantize == "none" and args.gguf is None:
        return ppcl.load_pipeline(args.pipeline, args.addon, level=args.level, dtype=dtype)
    flag = "--gguf" if args.gguf is not None else "--quantize"
    if args.pipeline is None or (args.addon is not None and artefact_kind(args.addon) != "addon"):
        raise ConfigError(
            f"{flag} loads a base pipeline's transformer quantised",
            expected="--pipeline, with an add-on (--addon ADDON --level NAME) or none",
            found="the toy world" if args.pipeline is None else f"the merged model {args.addon}",
            fix=f"drop {flag} (a merged model is loaded as saved)",
        )
    if args.gguf is not None:
        kwargs = {"transformer": load_transformer(args.pipeline, dtype, args.quantize, gguf=args.gguf)}
    else:
        kwargs = pipeline_quantization(args.quantize, dtype)
    return ppcl.load_pipeline(args.pipeline, args.addon, level=args.level, dtype=dtype, **kwargs)
