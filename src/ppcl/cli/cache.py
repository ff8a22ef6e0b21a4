"""``ppcl cache``: encode training data ONCE with a pipeline's VAE and text encoder into a latent cache.

``--images DIR`` (key.png|jpg + key.txt) or ``--shards 'data-*.tar'`` (webdataset tar shards) are encoded from real
images; ``--prompts FILE`` has the teacher generate one image per prompt (the paper's setting). ``ppcl distill
--pipeline P --data CACHE`` then trains without ever loading the text encoder or VAE.
"""

from __future__ import annotations

import argparse

from ppcl.data.loading import DTYPE_CHOICES
from ppcl.errors import ConfigError
from ppcl.logging import get_logger

log = get_logger("cli.cache")


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("cache", help="encode images+captions or teacher generations into a latent cache")
    p.add_argument(
        "--pipeline",
        required=True,
        help="diffusers pipeline folder, or a Hub id in the local cache (FLUX.1, SD3, Qwen-Image)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", default=None, help="folder of key.png|jpg images with key.txt captions")
    src.add_argument(
        "--shards", default=None, help="glob of webdataset tar shards (quote it), members key.png|jpg + key.txt"
    )
    src.add_argument("--prompts", default=None, help="text file, one prompt per line: the teacher generates images")
    p.add_argument(
        "--resolution", type=int, required=True, help="target side in pixels; buckets keep about resolution² pixels"
    )
    p.add_argument("--out", required=True, help="output cache folder (must not exist)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard file")
    p.add_argument("--encode-batch", type=int, default=8, help="images per VAE / text-encoder call")
    p.add_argument("--max-sequence-length", type=int, default=None, help="text tokens (default: the pipeline's)")
    p.add_argument("--steps", type=int, default=28, help="--prompts: sampling steps per image")
    p.add_argument("--guidance", type=float, default=None, help="--prompts: guidance scale (default: pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="--prompts: noise seed")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="torch dtype")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ppcl.cli.calibrate import _read_prompts
    from ppcl.cli.common import check_device, require_positive, require_seed
    from ppcl.data import images as image_data
    from ppcl.data.latent_build import build_image_cache, build_prompt_cache
    from ppcl.data.loading import load_pipeline_folder, parse_dtype
    from ppcl.outputs import refuse_overlap

    require_positive(args, "resolution", "shard_size", "encode_batch", "max_sequence_length", "steps")
    require_seed(args, "seed")
    refuse_overlap(args.out, (args.pipeline, args.images, args.prompts))
    device = check_device(args.device)
    if Path(args.out).exists():
        raise ConfigError(
            "output folder already exists",
            expected="a new folder for the cache",
            found=args.out,
            fix="choose another --out or remove the folder",
        )
    # Read and check the data before the (large) pipeline loads.
    prompts = _read_prompts(args.prompts) if args.prompts is not None else None
    records = (
        image_data.scan_folder(args.images)
        if args.images is not None
        else image_data.scan_shards(args.shards)
        if args.shards is not None
        else None
    )
    pipe = load_pipeline_folder(args.pipeline, parse_dtype(args.dtype)).to(device)
    common = {
        "pipeline_path": args.pipeline,
        "shard_size": args.shard_size,
        "max_sequence_length": args.max_sequence_length,
    }
    if records is not None:
        source = {"images": args.images} if args.images is not None else {"shards": args.shards}
        build_image_cache(
            pipe, records, args.out, args.resolution, encode_batch=args.encode_batch, source=source, **common
        )
    else:
        build_prompt_cache(
            pipe,
            prompts or [],
            args.out,
            args.resolution,
            seed=args.seed,
            num_inference_steps=args.steps,
            guidance=args.guidance,
            **common,
        )
    log.info("cache → %s", args.out)
    print(args.out)
    return 0
