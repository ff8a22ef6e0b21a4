"""Peak GPU memory and time per step of ppcl's REAL depth-distillation trainer on the REAL-size Qwen-Image (20B config,
60 blocks, random weights), with and without gradient checkpointing: measured, to replace estimates in docs/scale.md.

What runs: the real trainer, :func:`ppcl.distill.trainer.distill_depth` (non-sequential mode: one frozen teacher
forward with recording hooks, each student called on its span's recorded input and scored against the span's recorded
output, AdamW on the students, bf16 autocast through accelerate, gradient clipping, a final checkpoint and add-on
written to a temporary folder that is deleted afterwards), for ``--steps`` optimiser steps (default 3) at batch 1,
once with gradient checkpointing off and once on (``--checkpointing both``, the default).

The teacher is :func:`real_size_latency.build_meta_teacher` of the real 20B config (meta device, nothing allocated),
materialised on ``--device`` with random bf16 weights (:func:`real_size_latency.materialize`, 20.43B parameters =
40.9 GB; the weights' values do not change memory or time). Plan: ONE depth span by default, the public interval
[15, 24] (inclusive teacher indices, ``Span(15, 25)`` half-open; ``--spans 15-24,42-43`` for others).
``PruningAddon.from_plan`` makes each student a copy of its span's first block, in the teacher's dtype (bf16); the
students are then cast to float32 (fp32 master weights: METHOD.md trains with bf16 autocast), and the output says so.

Why it fits one 80 GB card: teacher 40.9 GB (bf16, frozen, no gradients, no optimiser state) + one student block of
339.8M parameters in fp32 with AdamW: weights 4 + gradients 4 + two moments 8 = 16 B/param ≈ 5.4 GB + activations
of one student at 1328x1328 (6889 image + 256 text tokens; the teacher pass runs without grad and stops after the
last block a span needs, so only the recorded block inputs/outputs stay alive). Gradient checkpointing recomputes the
student in backward, trading its stored activations for a second student forward.

Inputs (as ``QwenImagePipeline`` calls the transformer; :func:`real_size_latency.make_inputs`): image tokens
``(1, 6889, 64)`` at 1328 px, text ``(1, 256, 3584)``, no text mask, a timestep drawn from U(0, 1) per batch index.

Measured per setting on CUDA: ``torch.cuda.max_memory_allocated`` (and reserved) over the whole run after
``reset_peak_memory_stats``; memory after the teacher alone and after teacher + students (before training); seconds
per step from the trainer's ``metrics.jsonl`` (``log_every=1``: the first step, with CUDA/cuBLAS warm-up, separately
from the median of the later steps; the checkpoint written after the last step is outside these rows) and the
trainer's own ``seconds_per_step`` (add-on provenance; includes the final checkpoint write). A run that runs out of
GPU memory is recorded as such (with the peak it reached) and the next setting still runs.

GPU run (one command, a few minutes on one H100/H200 including start-up; appends to benchmarks/RESULTS.md)::

    .venv/bin/python benchmarks/real_size_distill_step.py --device cuda --json $OUT/distill_step.json

With a quantised teacher (torchao int8 / fp8 weight-only, bitsandbytes NF4, GGUF Q8_0 as diffusers' ``GGUFLinear``
holds it; the students stay fp32)::

    .venv/bin/python benchmarks/real_size_distill_step.py --device cuda --quantize int8 --checkpointing on

The final checkpoint of each run (students + AdamW state, 4 GB for one span) goes to a temporary folder
(``--tmp-root``, default the system's) and is deleted.

Without a GPU (never appends unless ``--append``; the whole path at tiny widths, seconds)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/real_size_distill_step.py --tiny --device cpu --no-append

``--tiny`` keeps the class, the 60 blocks and the spans but shrinks every width (real_size_latency.TINY), 128 px and
16 text tokens. On the CPU memory is not measured (``None``).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _results import append
from ppcl.addon import PruningAddon
from ppcl.arch import get_spec
from ppcl.distill.run_folder import METRICS_FILE
from ppcl.distill.trainer import DistillConfig, distill_depth
from ppcl.plan import DepthReplacement, Level, PruningPlan, Span
from real_size_latency import (
    QWEN_IMAGE_20B,
    TINY,
    build_meta_teacher,
    make_inputs,
    materialize,
)

LEVEL = "depth"
PUBLIC_SPAN = "15-24"  # the public interval [15, 24] (inclusive), the largest of the authors' Qwen-Image plan
SETTINGS = {"off": (False,), "on": (True,), "both": (False, True)}


# ----------------------------------------------------------------------------------------------------- inputs
class SyntheticBatches:
    """A :class:`~ppcl.distill.data.DistillData`: random transformer inputs, a pure function of the batch index.

    Args:
        config: the transformer config (channels, text width, patch size).
        height, width: image size in pixels. text_len: text tokens. device, dtype: of the tensors.
    """

    batch_size = 1

    def __init__(
        self,
        config: Mapping[str, Any],
        height: int,
        width: int,
        text_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.config, self.height, self.width, self.text_len = config, height, width, text_len
        self.device, self.dtype = device, dtype

    def batch(self, index: int) -> dict[str, Any]:
        """``hidden_states``, ``encoder_hidden_states``, ``timestep`` (U(0, 1)), ``img_shapes`` for batch ``index``;
        no ``return_dict`` (the trainer passes it)."""
        inputs = make_inputs(self.config, self.height, self.width, self.text_len, self.device, self.dtype, seed=index)
        t = torch.rand(1, generator=torch.Generator().manual_seed(10_000 + index))
        inputs["timestep"] = t.to(self.device, self.dtype)
        return inputs

    def describe(self) -> dict[str, Any]:
        """JSON-able description (recorded in the add-on's provenance)."""
        return {
            "source": "synthetic random inputs (benchmarks/real_size_distill_step.py)",
            "height": self.height,
            "width": self.width,
            "text_tokens": self.text_len,
            "batch_size": self.batch_size,
        }


# ------------------------------------------------------------------------------------------------------- plan
def parse_spans(text: str) -> list[tuple[int, int]]:
    """``"15-24,42-43"`` → ``[(15, 24), (42, 43)]`` (inclusive teacher block indices, the paper's notation)."""
    spans = []
    for part in text.split(","):
        try:
            u, v = (int(x) for x in part.strip().split("-"))
        except ValueError:
            raise SystemExit(f"--spans: {part!r} is not u-v (inclusive block indices, e.g. 15-24)") from None
        spans.append((u, v))
    return spans


def build_depth_plan(model: nn.Module, spans: Sequence[tuple[int, int]]) -> PruningPlan:
    """One level ``depth`` with one depth replacement per inclusive span, students initialised from the first block."""
    arch = get_spec(model)
    reps = [DepthReplacement(Span.from_inclusive(u, v), "first") for u, v in spans]
    return PruningPlan(
        arch.name, type(model).__name__, tuple(arch.stack_sizes(model)), reps, [Level(LEVEL, tuple(r.id for r in reps))]
    ).validate()


# ---------------------------------------------------------------------------------------------------- running
def _gb(n_bytes: float) -> float:
    return n_bytes / 1e9


def _allocated(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return _gb(torch.cuda.memory_allocated(device))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _step_seconds(metrics: Path) -> list[float]:
    """Seconds of each step from ``metrics.jsonl`` (``log_every=1``: row ``k`` holds the time since the start)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    cumulative = [float(row["seconds"]) for row in rows]
    return [b - a for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)]


def quantize_teacher(model: nn.Module, kind: str) -> None:
    """Quantise every linear layer of the teacher's blocks in place, as a quantised base would be loaded: torchao
    int8 / fp8 weight-only (``quantize_``), bitsandbytes NF4 (``Linear4bit``, quantised when moved to the GPU), or
    GGUF Q8_0 (diffusers' ``GGUFLinear``, what ``from_single_file`` of a Q8_0 file builds; :func:`gguf_q8_0_linear`)."""
    if kind == "none":
        return
    blocks = get_spec(model).blocks(model)
    if kind == "q8_0":
        for block in blocks:
            for name, linear in [(n, m) for n, m in block.named_modules() if type(m) is nn.Linear]:
                parent_name, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent_name) if parent_name else block, child, gguf_q8_0_linear(linear))
            _free(next(block.parameters()).device)
        return
    if kind in ("int8", "fp8"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
        for block in blocks:
            quantize_(block, config)
        return
    import bitsandbytes as bnb

    for block in blocks:
        for name, linear in [(n, m) for n, m in block.named_modules() if type(m) is nn.Linear]:
            device, dtype = linear.weight.device, linear.weight.dtype
            layer = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=dtype,
                quant_type="nf4", device="meta",
            )  # fmt: skip
            layer.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if linear.bias is not None:
                layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child, layer.to(device).eval())
        _free(next(block.parameters()).device)


def pack_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """GGUF ``Q8_0`` bytes of ``weight`` ``(out, in)`` (``in`` a multiple of 32): per 32 values one float16 scale
    ``d = max|x| / 127`` and 32 int8 ``x · (1/d)`` rounded half away from zero, 34 bytes, the arithmetic of
    ``gguf.quants.quantize`` step for step (float32); computed with torch on the weight's device (the numpy quantiser
    would take minutes for 20B weights). ``(out, in / 32 · 34)``."""
    out_features, in_features = weight.shape
    blocks = weight.float().reshape(out_features, in_features // 32, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    scaled = blocks * torch.where(d == 0, 0.0, 1 / d)
    magnitude = scaled.abs()
    floor = magnitude.floor()
    q = (scaled.sign() * (floor + (2 * (magnitude - floor)).floor())).to(torch.int8)
    scale = d.to(torch.float16).view(torch.uint8).reshape(out_features, in_features // 32, 2)
    return torch.cat([scale, q.view(torch.uint8)], dim=-1).reshape(out_features, -1)


def gguf_q8_0_linear(linear: nn.Linear) -> nn.Module:
    """diffusers' ``GGUFLinear`` holding ``linear``'s weight as Q8_0 bytes (:func:`pack_q8_0`), bias kept, computing
    in the weight's dtype."""
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter
    from gguf import GGMLQuantizationType

    dtype = linear.weight.dtype
    with torch.device("meta"):
        layer = GGUFLinear(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=dtype)
    layer.weight = GGUFParameter(pack_q8_0(linear.weight.data), quant_type=GGMLQuantizationType.Q8_0)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.requires_grad_(False).eval()


def make_students(model: nn.Module, plan: PruningPlan) -> tuple[PruningAddon, str]:
    """``PruningAddon.from_plan`` and the students cast to float32; also returns from_plan's own student dtype."""
    addon = PruningAddon.from_plan(model, plan)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in addon.students.parameters()})
    addon.students.float()
    return addon, ",".join(dtypes)


def train_once(
    model: nn.Module,
    plan: PruningPlan,
    data: SyntheticBatches,
    args: argparse.Namespace,
    checkpointing: bool,
    device: torch.device,
) -> dict[str, Any]:
    """Fresh students, then ``args.steps`` steps of the real trainer; memory, times and losses of this run."""
    addon, _ = make_students(model, plan)
    memory_before = _allocated(device)
    config = DistillConfig(
        steps=args.steps,
        batch_size=1,
        mixed_precision="bf16",
        gradient_checkpointing=checkpointing,
        checkpoint_every=0,
        log_every=1,
        lr=1e-5,
        warmup=0,
    )
    out = Path(tempfile.mkdtemp(prefix="ppcl_distill_step_", dir=args.tmp_root))
    oom = False
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        try:
            distill_depth(model, addon, data, config, out / "run")
        except torch.OutOfMemoryError:  # a measurement too: record the peak reached and go on
            oom = True
        peak = peak_reserved = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = _gb(torch.cuda.max_memory_allocated(device))
            peak_reserved = _gb(torch.cuda.max_memory_reserved(device))
        steps = [] if oom else _step_seconds(out / "run" / METRICS_FILE)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    record = addon.provenance.get("depth", {})
    result = {
        "gradient_checkpointing": checkpointing,
        "out_of_memory": oom,
        "memory_before_training_gb": memory_before,
        "peak_allocated_gb": peak,
        "peak_reserved_gb": peak_reserved,
        "step_seconds": steps,
        "first_step_s": steps[0] if steps else None,
        "later_steps_median_s": statistics.median(steps[1:]) if len(steps) > 1 else None,
        "trainer_seconds_per_step": None if oom else float(record["seconds_per_step"]),
        "teacher_forward_ratio": record.get("teacher_forward_ratio"),
        "final_loss": None if oom else float(sum(addon.metrics["depth_loss"].values())),
    }
    del addon
    _free(device)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the teacher and plan, train with each checkpointing setting; returns the JSON-able result."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    default = "cuda" if torch.cuda.is_available() else "cpu"
    if device.type != default:
        raise SystemExit(f"the trainer runs on accelerate's device ({default} here): pass --device {default}")
    config = TINY if args.tiny else QWEN_IMAGE_20B
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("The full-size model (41 GB in bf16) needs a GPU: pass --device cuda, or --tiny on the CPU")
    model = build_meta_teacher(config)
    plan = build_depth_plan(model, args.spans)
    materialize(model, device, dtype, seed=0)
    teacher_params = sum(p.numel() for p in model.parameters())
    teacher_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    quantize_teacher(model, args.quantize)  # teacher_* above count the unquantised model; memory_teacher measures
    _free(device)
    memory_teacher = _allocated(device)
    addon, plan_dtype = make_students(model, plan)  # counted once here; each run makes its own fresh copy
    student_params = sum(p.numel() for p in addon.students.parameters())
    student_dtype = ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in addon.students.parameters()}))
    del addon
    _free(device)
    data = SyntheticBatches(config, args.height, args.width, args.text_len, device, dtype)
    runs = {
        ("on" if g else "off"): train_once(model, plan, data, args, g, device) for g in SETTINGS[args.checkpointing]
    }
    scale = 8 * int(config["patch_size"])
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "tiny": args.tiny,
        "device": _device_name(device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "height": args.height,
        "width": args.width,
        "image_tokens": (args.height // scale) * (args.width // scale),
        "text_tokens": args.text_len,
        "steps": args.steps,
        "spans": [list(s) for s in args.spans],
        "plan": plan.to_json(),
        "teacher_params": teacher_params,
        "teacher_gb": _gb(teacher_bytes),
        "student_params": student_params,
        "student_dtype_from_plan": plan_dtype,
        "student_dtype": student_dtype,
        "students_cast_to_float32": plan_dtype != "float32",
        "adamw_fp32_estimate_gb": _gb(16 * student_params),
        "memory_teacher_gb": memory_teacher,
        "runs": runs,
        "trainer": {
            "mode": "nonsequential",
            "optimizer": "torch.optim.AdamW (fp32 states; fused on CUDA)",
            "mixed_precision": "bf16",
            "lr": 1e-5,
            "batch_size": 1,
            "grad_clip": DistillConfig().grad_clip,
        },
    }


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------------- output
def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: Mapping[str, Any]) -> str:
    """Markdown: one row per gradient-checkpointing setting."""
    lines = [
        (
            "| gradient checkpointing | memory before training GB | peak allocated GB | peak reserved GB | "
            "first step s | later steps s (median) | trainer s/step | teacher share | final loss |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        times = " | ".join(
            _fmt(r[k], ".3f") for k in ("first_step_s", "later_steps_median_s", "trainer_seconds_per_step")
        )
        loss = "out of memory" if r["out_of_memory"] else _fmt(r["final_loss"], ".4g")
        lines.append(
            f"| {name} | {_fmt(r['memory_before_training_gb'])} | {_fmt(r['peak_allocated_gb'])} | "
            f"{_fmt(r['peak_reserved_gb'])} | {times} | {_fmt(r['teacher_forward_ratio'], '.2f')} | {loss} |"
        )
    return "\n".join(lines)


def _params(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def _body(result: Mapping[str, Any]) -> str:
    spans = " ".join(f"[{u},{v}]" for u, v in result["spans"])
    cast = (
        f"from_plan made them {result['student_dtype_from_plan']} (the teacher's dtype); cast to "
        f"{result['student_dtype']} (fp32 master weights)"
        if result["students_cast_to_float32"]
        else f"{result['student_dtype']} as from_plan made them"
    )
    teacher_mem = result["memory_teacher_gb"]
    loaded = f" ({teacher_mem:.2f} GB allocated after loading it)" if teacher_mem is not None else ""
    size = f"{result['height']}x{result['width']} ({result['image_tokens']} image tokens)"
    return "\n".join(
        [
            f"Device {result['device']}, torch {result['torch']}.",
            "",
            (
                f"- teacher: Qwen-Image{' at tiny widths (--tiny)' if result['tiny'] else ''}, config "
                f"`{json.dumps(result['config'])}`; {_params(result['teacher_params'])} parameters, {result['dtype']}, "
                f"random weights, {result['teacher_gb']:.3g} GB unquantised{loaded}, frozen; blocks' linear layers "
                f"quantised: {result.get('quantize', 'none')}"
            ),
            f"- spans {spans} (inclusive): students {_params(result['student_params'])} parameters; {cast}",
            (
                "- real trainer `distill_depth` (non-sequential), torch AdamW (fused on CUDA) with fp32 states (weights + gradients + two "
                f"moments = 16 B/param = {result['adamw_fp32_estimate_gb']:.3g} GB), bf16 autocast, batch 1, {size}, "
                f"{result['text_tokens']} text tokens, {result['steps']} steps per setting, fresh students each"
            ),
            (
                "- peak = torch.cuda.max_memory_allocated over the run, teacher included; 'first step' includes warm-up; "
                "'trainer s/step' is the trainer's own mean (final checkpoint write included); 'teacher share' is the "
                "teacher pass's fraction of a step"
            ),
            "",
            format_table(result),
        ]
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults depend on ``--tiny`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="teacher dtype (default bfloat16, also with --tiny)",
    )
    parser.add_argument("--spans", default=PUBLIC_SPAN, help="inclusive intervals u-v, comma separated (default 15-24)")
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per setting (default 3)")
    parser.add_argument(
        "--checkpointing",
        default="both",
        choices=list(SETTINGS),
        help="gradient checkpointing off, on, or both runs (default)",
    )
    parser.add_argument("--height", type=int, default=None, help="pixels (default 1328; 128 with --tiny)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default 1328; 128 with --tiny)")
    parser.add_argument("--text-len", type=int, default=None, help="text tokens (default 256; 16 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="60 blocks, tiny widths (CPU, seconds)")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8", "fp8", "nf4", "q8_0"],
        help="quantise the teacher's block linears: torchao int8 / fp8 weight-only, bitsandbytes NF4, GGUF Q8_0 "
        "(default none)",
    )
    parser.add_argument("--tmp-root", default=None, help="where the temporary run folders go (default: the system's)")
    parser.add_argument("--json", default=None, help="also write the result here")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--append", action="store_true", help="append to RESULTS.md even with --tiny or on the CPU")
    group.add_argument("--no-append", action="store_true", help="never append to RESULTS.md")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.spans = parse_spans(args.spans)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    args.height = args.height or (128 if args.tiny else 1328)
    args.width = args.width or (128 if args.tiny else 1328)
    args.text_len = args.text_len or (16 if args.tiny else 256)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run, print the table, write ``--json``, append to RESULTS.md (full size on a GPU, or ``--append``)."""
    args = parse_args(argv)
    torch.manual_seed(0)
    result = run(args)
    body = _body(result)
    print(body)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    real_gpu_run = not args.tiny and args.device.startswith("cuda")
    if args.append or (not args.no_append and real_gpu_run):
        append("Real-size Qwen-Image depth distillation step (one GPU): peak memory and time, real trainer", body)
    return result


if __name__ == "__main__":
    main()
