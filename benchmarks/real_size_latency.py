"""Per-step latency of the REAL-size Qwen-Image transformer (20B config, random weights) and its PPCL merged forms.

Times one denoising step (one transformer forward, batch 1) at 1328x1328 for
(a) the teacher, 60 blocks;
(b) the authors' public depth plan merged, 35 blocks (inclusive intervals [3,4] [5,7] [8,10] [11,12] [15,24] [25,27]
    [29,30] [42,43] [45,47] [48,49] [52,53] [54,55] [56,57], METHOD.md);
(c) (b) + the public width choice: text runs [36,37] [40,41] [50,59] and the FFNs of blocks 2, 58, 59 (inclusive
    teacher indices; METHOD.md Stage 2), merged with ``ppcl.runtime.merge`` (width substitutions replayed).
and compares the ratios with the paper's 2625 → 1514 → 1462 ms (H20 GPUs; the 1462 ms model is the 10B + fine-tune).

Latency does not depend on the weights' values, so no checkpoint is needed: weights are random.

Memory (why it fits an 80 GB card): every model is built with its parameters on the meta device (nothing
allocated); the add-on (``PruningAddon.from_plan``) and both merges (``ppcl.runtime.merge``) run there too. Only then
is the teacher materialised on the GPU with random weights (20.43B bf16 parameters = 40.9 GB), and the two merged
models *borrow* the teacher's tensors: merged block ``i`` takes the storage of teacher block ``kept[i]`` (a student
starts as a copy of its span's first block, so the shapes match), cut modulation weights are row views of the
teacher's, and only the width projections (15 ``3072 x 3072`` maps, in the timed dtype as ``merge`` ships them, 0.28 GB in bf16) are
allocated. All three models therefore live at once in ~41.5 GB plus activations, and are timed *interleaved*
(``ppcl.eval.latency.interleaved_latency``), so slow drifts of the GPU spread evenly over the variants. Borrowing
gives no cache advantage: a block's weights (680 MB) are far larger than the GPU's L2 cache, and within one forward
every block reads distinct tensors. (Holding three independent copies would need 41 + 24 + 21 GB: too much for 80 GB.)

Inputs, as ``QwenImagePipeline`` calls the transformer: image tokens ``(1, (H/16)*(W/16), 64)`` (VAE 8x downsampling,
2x2 patches of 16 latent channels; 1328 px → 83 x 83 = 6889 tokens), text ``(1, text_len, 3584)`` (default 256 tokens),
no text mask (the pipeline drops an all-ones mask), timestep ``(1,)``.

GPU run (one command, ~1-2 min on one H100/H200 including start-up; appends to benchmarks/RESULTS.md)::

    .venv/bin/python benchmarks/real_size_latency.py --device cuda --repeats 10 --warmup 3 \
        --json runs/real_size_latency.json

Without a GPU (never appends unless ``--append``)::

    .venv/bin/python benchmarks/real_size_latency.py --flops-only   # full size, FLOPs on the meta device, ~10 s
    .venv/bin/python benchmarks/real_size_latency.py --tiny         # the whole path at tiny widths, seconds

Full-size FLOPs per step (1328 px, 256 text tokens; --flops-only): teacher 134.8 TFLOPs, depth 78.6 (0.583),
depth+width 75.5 (0.560); parameters 20.430B / 11.935B / 10.453B.

``--tiny`` keeps the class, the 60 blocks and the public plan (so 60 → 35 blocks and the same width substitutions)
but shrinks every width (2 heads of 16, text dim 32, 16 input channels): the whole path runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from _results import append
from ppcl.addon import PruningAddon
from ppcl.arch import get_spec
from ppcl.eval.flops import forward_flops
from ppcl.eval.latency import interleaved_latency, ratios
from ppcl.modules.projection import ResidualLinear
from ppcl.plan import DepthReplacement, Level, PruningPlan, Span, with_width_level
from ppcl.runtime import merge

MODEL_CLASS = "QwenImageTransformer2DModel"
# The real 20B Qwen-Image config (same as tests/test_plan.py::test_real_qwen_image_public_plan_counts).
QWEN_IMAGE_20B: dict[str, Any] = {
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "in_channels": 64,
    "out_channels": 16,
    "patch_size": 2,
    "axes_dims_rope": (16, 56, 56),
    "guidance_embeds": False,
}
# Same depth (60 blocks, so the public plan applies unchanged) and the same class, tiny widths: runs on a CPU in seconds.
TINY: dict[str, Any] = {
    **QWEN_IMAGE_20B,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "in_channels": 16,
    "out_channels": 4,
    "axes_dims_rope": (8, 4, 4),
}


@dataclass(frozen=True)
class PlanSpec:
    """Depth intervals, text runs and FFN blocks (all inclusive flat teacher indices, the paper's notation)."""

    depth: tuple[tuple[int, int], ...]
    text_runs: tuple[tuple[int, int], ...]
    ffn_blocks: tuple[int, ...]

    def describe(self) -> str:
        """One line, inclusive intervals."""
        return (
            f"depth = intervals {' '.join(f'[{u},{v}]' for u, v in self.depth)} merged (inclusive); depth+width ="
            f" + text runs {' '.join(f'[{a},{b}]' for a, b in self.text_runs)} and the FFNs of blocks "
            f"{', '.join(map(str, self.ffn_blocks))}"
        )


# The authors' public Qwen-Image choice (METHOD.md).
PUBLIC = PlanSpec(
    depth=(
        (3, 4),
        (5, 7),
        (8, 10),
        (11, 12),
        (15, 24),
        (25, 27),
        (29, 30),
        (42, 43),
        (45, 47),
        (48, 49),
        (52, 53),
        (54, 55),
        (56, 57),
    ),
    text_runs=((36, 37), (40, 41), (50, 59)),
    ffn_blocks=(2, 58, 59),
)
DEPTH, WIDTH = "depth", "depth+width"
# Paper, Qwen-Image per-step latency (ms): teacher, PPCL 12B (public depth), PPCL 10B + FT (depth + width).
PAPER_MS = {"teacher": 2625.0, DEPTH: 1514.0, WIDTH: 1462.0}


# ------------------------------------------------------------------------------------------------ building
def build_meta_teacher(config: Mapping[str, Any]) -> nn.Module:
    """The diffusers model with every parameter on the meta device (buffers and RoPE tables are real, on the CPU)."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    with init_empty_weights(include_buffers=False):
        return QwenImageTransformer2DModel(**config).eval()


def build_plan(model: nn.Module, spec: PlanSpec) -> PruningPlan:
    """Level ``depth`` (the depth intervals) and level ``depth+width`` (+ text runs and FFN blocks on top of it)."""
    arch = get_spec(model)
    reps = [DepthReplacement(Span.from_inclusive(u, v), "first") for u, v in spec.depth]
    plan = PruningPlan(
        arch.name, type(model).__name__, tuple(arch.stack_sizes(model)), reps, [Level(DEPTH, tuple(r.id for r in reps))]
    ).validate()
    return with_width_level(plan, WIDTH, spec.text_runs, spec.ffn_blocks, base_level=DEPTH)


def merged_on_meta(
    teacher: nn.Module, plan: PruningPlan, projection_dtype: torch.dtype | None = None
) -> dict[str, tuple[nn.Module, list[int]]]:
    """Both levels merged while the teacher is still on the meta device: ``{level: (merged model, kept blocks)}``.

    Students are copies of their span's first block (``init="first"``), so merged block ``i`` has exactly the shapes
    of teacher block ``kept[i]``. ``projection_dtype``: of the width maps (``merge``'s default: the teacher's dtype).
    """
    addon = PruningAddon.from_plan(teacher, plan)
    return {
        level: (merge(teacher, addon, level, projection_dtype=projection_dtype).eval(), plan.kept_blocks(level))
        for level in (DEPTH, WIDTH)
    }


def _random_tensor(
    shape: torch.Size, dtype: torch.dtype, device: torch.device, norm: bool, generator: torch.Generator
) -> Tensor:
    # Values only need to be finite and tame (latency does not depend on them): small normal matrices, unit norm
    # scales, zero biases.
    if len(shape) >= 2:
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
    return (torch.ones if norm else torch.zeros)(shape, dtype=dtype, device=device)


def _borrow(donor: Mapping[str, Tensor], name: str, shape: torch.Size, dtype: torch.dtype) -> Tensor | None:
    """The donor tensor ``name`` if it has ``shape`` and ``dtype``, a leading-rows view of it if only its first dim is
    larger (a cut modulation weight), else None."""
    source = donor.get(name)
    if source is None or source.dtype != dtype or source.dim() != len(shape):
        return None
    if tuple(source.shape) == tuple(shape):
        return source
    if tuple(source.shape[1:]) == tuple(shape[1:]) and source.shape[0] >= shape[0]:
        return source[: shape[0]]  # contiguous: leading rows of a row-major tensor
    return None


def materialize(
    model: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    donor: Mapping[str, Tensor] | None = None,
    kept: Sequence[int] | None = None,
) -> int:
    """Replace every meta parameter of ``model`` in place; returns the number of newly allocated elements.

    Args:
        model: a model whose parameters are (partly) on the meta device.
        device, dtype: where and in which dtype parameters live; width projections (:class:`ResidualLinear`) keep
            their own dtype (as ``merge`` made them: ``--projection-dtype``).
        seed: seed of the random values.
        donor: ``{name: tensor}`` of a materialised teacher; a parameter whose (renamed) name, shape and dtype match
            shares the donor's storage instead of allocating.
        kept: the teacher block index of each merged block (renames ``transformer_blocks.i.*`` for the donor).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    allocated = 0
    for module_name, module in model.named_modules():
        for leaf, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            name = f"{module_name}.{leaf}" if module_name else leaf
            want = param.dtype if isinstance(module, ResidualLinear) else dtype
            tensor = _borrow(donor, _teacher_name(name, kept), param.shape, want) if donor is not None else None
            if tensor is None:
                norm = "norm" in type(module).__name__.lower()
                tensor = _random_tensor(param.shape, want, device, norm, generator)
                allocated += tensor.numel()
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    model.to(device)  # buffers (the parameters are already there)
    return allocated


def _teacher_name(name: str, kept: Sequence[int] | None) -> str:
    """``transformer_blocks.i.rest`` of a merged model → ``transformer_blocks.kept[i].rest`` of the teacher."""
    parts = name.split(".")
    if kept is not None and len(parts) > 2 and parts[0] == "transformer_blocks":
        parts[1] = str(kept[int(parts[1])])
    return ".".join(parts)


# ------------------------------------------------------------------------------------------------- timing
def make_inputs(
    config: Mapping[str, Any],
    height: int,
    width: int,
    text_len: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> dict[str, Any]:
    """One denoising step's transformer inputs at batch 1.

    Returns:
        ``hidden_states`` ``(1, (H/16)(W/16), in_channels)``, ``encoder_hidden_states`` ``(1, text_len,
        joint_attention_dim)``, ``timestep`` ``(1,)`` in [0, 1], ``img_shapes`` ``[(1, H/16, W/16)]``; no text mask.
    """
    scale = 8 * int(config["patch_size"])  # VAE downsampling x patch size
    if height % scale or width % scale:
        raise SystemExit(f"--height/--width must be multiples of {scale}")
    h, w = height // scale, width // scale
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, h * w, int(config["in_channels"]), generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(1, text_len, int(config["joint_attention_dim"]), generator=g).to(
            device, dtype
        ),
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
        "img_shapes": [(1, h, w)],
    }


def _step(model: nn.Module, inputs: dict[str, Any]) -> Callable[[], Tensor]:
    """One denoising step of ``model`` on ``inputs`` as a zero-argument callable; returns the velocity sample."""

    def run() -> Tensor:
        return model(**inputs, return_dict=False)[0]

    return run


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _flops_on_meta(
    models: Mapping[str, nn.Module], config: Mapping[str, Any], args: argparse.Namespace
) -> dict[str, int]:
    """Forward FLOPs of each still-meta model (torch's FlopCounterMode on meta tensors: no memory, no device)."""
    inputs = make_inputs(config, args.height, args.width, args.text_len, torch.device("meta"), torch.float32)
    return {name: forward_flops(model, inputs) for name, model in models.items()}


def _time(
    models: Mapping[str, nn.Module], inputs: dict[str, Any], args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, list[int]], dict[str, dict[str, float]]]:
    """Output shapes (one untimed step each) and interleaved timing ``{name: {median_ms, min_ms, iqr_ms, ratio}}``."""
    with torch.inference_mode():
        shapes = {name: list(_step(model, inputs)().shape) for name, model in models.items()}
    timing = interleaved_latency({n: _step(m, inputs) for n, m in models.items()}, args.repeats, args.warmup, device)
    for name, ratio in ratios(timing, "teacher").items():
        timing[name]["ratio"] = ratio
    return shapes, timing


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, count, time and describe the three variants; returns the JSON-able result (see :func:`format_table`).

    With ``args.flops_only`` nothing is materialised or timed (any device, the full size included).
    """
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = TINY if args.tiny else QWEN_IMAGE_20B
    if device.type != "cuda" and not (args.tiny or args.flops_only):
        raise SystemExit(
            "The full-size model (41 GB in bf16) needs a GPU: pass --device cuda, or --tiny / --flops-only on the CPU"
        )
    teacher = build_meta_teacher(config)
    plan = build_plan(teacher, PUBLIC)
    # The meta teacher is float32: the maps take the timed dtype unless --projection-dtype float32 asks otherwise.
    projection_dtype = torch.float32 if args.projection_dtype == "float32" else dtype
    merged = merged_on_meta(teacher, plan, projection_dtype)
    models = {"teacher": teacher, **{level: model for level, (model, _) in merged.items()}}
    flops = _flops_on_meta(models, config, args)
    extra: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    timing: dict[str, dict[str, float]] = {}
    if not args.flops_only:
        materialize(teacher, device, dtype, seed=0)
        donor = dict(teacher.named_parameters())
        extra = {level: materialize(model, device, dtype, 1, donor, kept) for level, (model, kept) in merged.items()}
        inputs = make_inputs(config, args.height, args.width, args.text_len, device, dtype)
        shapes, timing = _time(models, inputs, args, device)
    variants = {}
    for name, model in models.items():
        count = plan.param_count(dict(teacher.config), None if name == "teacher" else name)
        variants[name] = {
            "blocks": len(get_spec(model).blocks(model)),
            "params": _param_count(model),
            "plan_params": count.after,
            "flops": flops[name],
            "flops_ratio": flops[name] / flops["teacher"],
            "allocated_extra": extra.get(name),
            "output_shape": shapes.get(name),
            **timing.get(name, {}),
            "paper_ms": PAPER_MS[name],
            "paper_ratio": PAPER_MS[name] / PAPER_MS["teacher"],
        }
    scale = 8 * int(config["patch_size"])
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "tiny": args.tiny,
        "flops_only": args.flops_only,
        "device": "meta (no timing)" if args.flops_only else _device_name(device),
        "dtype": args.dtype,
        "projection_dtype": "float32" if args.projection_dtype == "float32" else args.dtype,
        "height": args.height,
        "width": args.width,
        "image_tokens": (args.height // scale) * (args.width // scale),
        "text_tokens": args.text_len,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "plan_description": PUBLIC.describe(),
        "plan": plan.to_json(),
        "variants": variants,
    }


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def format_table(result: Mapping[str, Any]) -> str:
    """Markdown: one row per variant (blocks, params, median/min/IQR ms, ratio vs teacher, the paper's ms and ratio)."""
    lines = [
        (
            "| variant | blocks | params | TFLOPs | FLOPs ratio | median ms | min ms | IQR ms | latency ratio | "
            "paper ms (H20) | paper ratio |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        timed = (
            f"{v['median_ms']:.1f} | {v['min_ms']:.1f} | {v['iqr_ms']:.1f} | {v['ratio']:.3f}"
            if "median_ms" in v
            else "- | - | - | -"
        )
        lines.append(
            f"| {name} | {v['blocks']} | {_fmt_params(v['params'])} | {v['flops'] / 1e12:.3g} | "
            f"{v['flops_ratio']:.3f} | {timed} | {v['paper_ms']:.0f} | {v['paper_ratio']:.3f} |"
        )
    return "\n".join(lines)


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def _body(result: Mapping[str, Any]) -> str:
    peak = result["peak_gpu_gb"]
    if result["flops_only"]:
        timing = "FLOPs only (meta device, nothing timed)."
    else:
        timing = (
            f"random weights; {result['repeats']} interleaved repeats after {result['warmup']} warm-up rounds, "
            "median"
            + (
                f"; peak GPU memory {peak:.1f} GB (all three models at once, the merged ones borrow "
                "the teacher's tensors)."
                if peak is not None
                else "."
            )
        )
    return "\n".join(
        [
            f"Device {result['device']}, {result['dtype']}, batch 1, {result['height']}x{result['width']} "
            f"({result['image_tokens']} image tokens), {result['text_tokens']} text tokens, one transformer forward; "
            + timing,
            "",
            format_table(result),
            "",
            ("Tiny widths (--tiny), 60 blocks, " if result["tiny"] else "")
            + "the authors' public plan: "
            + result["plan_description"]
            + f" (width projections in {result.get('projection_dtype', 'float32')}). FLOPs: torch FlopCounterMode on the meta device "
            "(a multiply-add counts 2). Paper figures (H20, real 20B model): teacher, PPCL 12B (public depth), "
            "PPCL 10B+FT (depth + width); compare ratios, not ms (other GPU; the paper's per-step time may include "
            "both classifier-free-guidance forwards).",
        ]
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults depend on ``--tiny`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="default: bfloat16 (float32 with --tiny on the CPU)",
    )
    parser.add_argument("--height", type=int, default=None, help="pixels (default 1328; 128 with --tiny)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default 1328; 128 with --tiny)")
    parser.add_argument("--text-len", type=int, default=None, help="text tokens (default 256; 16 with --tiny)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="60 blocks, public plan, tiny widths (CPU, seconds)")
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="count FLOPs on the meta device only (no memory, no timing; works without a GPU)",
    )
    parser.add_argument(
        "--projection-dtype",
        default="model",
        choices=["model", "float32"],
        help="width maps in the timed dtype (merge's default since issue 16) or float32 (before) (default model)",
    )
    parser.add_argument("--json", default=None, help="also write the result here")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--append", action="store_true", help="append to RESULTS.md even with --tiny or on the CPU")
    group.add_argument("--no-append", action="store_true", help="never append to RESULTS.md")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu_tiny = args.tiny and args.device == "cpu"
    args.dtype = args.dtype or ("float32" if cpu_tiny else "bfloat16")
    args.height = args.height or (128 if args.tiny else 1328)
    args.width = args.width or (128 if args.tiny else 1328)
    args.text_len = args.text_len or (16 if args.tiny else 256)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run, print the table, write ``--json``, append to RESULTS.md (full size on a GPU, or ``--append``)."""
    args = parse_args(argv)
    torch.manual_seed(0)
    result = run(args)
    print(_body(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    real_gpu_run = not (args.tiny or args.flops_only) and args.device.startswith("cuda")
    if args.append or (not args.no_append and real_gpu_run):
        append(
            "Real-size Qwen-Image per-step latency (random weights): teacher vs public depth vs depth+width",
            _body(result),
        )
    return result


if __name__ == "__main__":
    main()
