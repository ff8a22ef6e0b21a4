"""The add-on runtime with diffusers' offload and regional compilation on a real accelerator (issue 16): the checks
``tests/test_hooks.py`` can only make with the CPU as execution device and the eager compile backend.

1. CPU offload, on the tiny FLUX.1 pipeline of the tests (``tests/tiny_pipelines.py``) with a perturbed two-span
   add-on at level ``b``: the images of the pipeline on the device without offload, against
   ``enable_model_cpu_offload`` and the transformer's block-level group offload (add-on applied before and after),
   and ``enable_sequential_cpu_offload`` enabled before the add-on is loaded and applied (students then live on the device, the base's weights in the hooks); and
   whether enabling sequential offload after applying is refused clearly.
2. Regional compilation with the default (inductor) backend: ``compile_repeated_blocks(fullgraph=True)`` of the tiny
   FLUX.1 transformer (``tests/tiny_models.py``) with the add-on applied, at levels None, ``a``, ``b``, and of a tiny
   width-merged Qwen-Image: the largest difference from eager, and the number of graphs compiled.

Appends to RESULTS.md unless ``--no-append``::

    .venv/bin/python benchmarks/runtime_check.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import ppcl  # noqa: E402
from _results import append  # noqa: E402
from ppcl.addon import PruningAddon  # noqa: E402
from ppcl.errors import PPCLError  # noqa: E402
from ppcl.runtime import apply_addon, merge, set_level  # noqa: E402
from test_addon_width import _perturb, width_plan  # noqa: E402
from test_hooks import flux_image, flux_pipeline_and_addon  # noqa: E402
from tiny_models import build_tiny, two_span_plan  # noqa: E402


def measure_offload(device: str) -> dict[str, Any]:
    """Max |difference| of each offload mode's image against the plain one on ``device``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder, addon = flux_pipeline_and_addon(Path(tmp))
        expected = flux_image(ppcl.load_pipeline(folder, addon, level="b").to(device))
        results: dict[str, Any] = {}
        pipe = ppcl.load_pipeline(folder, addon, level="b")
        pipe.enable_model_cpu_offload(device=device)
        results["model offload, add-on applied first"] = (flux_image(pipe) - expected).abs().max().item()
        pipe = ppcl.load_pipeline(folder)
        pipe.enable_model_cpu_offload(device=device)
        apply_addon(pipe.transformer, PruningAddon.from_pretrained(addon, pipe.transformer), "b")
        results["model offload, add-on applied after"] = (flux_image(pipe) - expected).abs().max().item()
        for order in ("before", "after"):
            pipe = ppcl.load_pipeline(folder).to(device)
            offload = {"onload_device": torch.device(device), "offload_type": "block_level", "num_blocks_per_group": 1}
            if order == "after":
                pipe.transformer.enable_group_offload(**offload)
            apply_addon(pipe.transformer, PruningAddon.from_pretrained(addon, pipe.transformer), "b")
            if order == "before":
                pipe.transformer.enable_group_offload(**offload)
            results[f"group offload (block level), add-on applied {order}"] = (
                (flux_image(pipe) - expected).abs().max().item()
            )
        pipe = ppcl.load_pipeline(folder)
        pipe.enable_sequential_cpu_offload(device=device)
        apply_addon(pipe.transformer, PruningAddon.from_pretrained(addon, pipe.transformer), "b")
        results["sequential offload, add-on applied after"] = (flux_image(pipe) - expected).abs().max().item()
        pipe = ppcl.load_pipeline(folder, addon, level="b")
        pipe.enable_sequential_cpu_offload(device=device)
        try:
            flux_image(pipe)
            results["sequential offload enabled after applying"] = "ran (unexpected)"
        except PPCLError as err:
            results["sequential offload enabled after applying"] = f"refused: {str(err).split('.')[0]}"
    return results


@torch.no_grad()
def measure_regional_compile(device: str) -> dict[str, Any]:
    """Max |compiled − eager| output of the tiny FLUX.1 with the add-on at each level, and the graphs compiled."""
    from torch._dynamo.utils import counters

    case = build_tiny("flux")
    model, inputs = case.model.to(device), {k: v.to(device) if isinstance(v, torch.Tensor) else v
                                             for k, v in case.make_inputs(0).items()}  # fmt: skip
    addon = PruningAddon.from_plan(model, two_span_plan(model))
    apply_addon(model, addon)
    levels = (None, "a", "b")
    eager = {}
    for level in levels:
        set_level(model, level)
        eager[level] = model(**inputs, return_dict=False)[0]
    torch._dynamo.reset()
    counters.clear()
    model.compile_repeated_blocks(fullgraph=True)
    results: dict[str, Any] = {}
    for level in levels:
        set_level(model, level)
        out = model(**inputs, return_dict=False)[0]
        results[f"regional compile (inductor), level {level}"] = (out - eager[level]).abs().max().item()
    results["graphs compiled"] = f"{counters['stats']['unique_graphs']} graphs"
    case = build_tiny("qwenimage")  # width: a text run and FFN maps, merged
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.make_inputs(0).items()}
    addon = PruningAddon.from_plan(case.model, width_plan(case.model))
    _perturb(addon)
    merged = merge(case.model, addon, "dw").to(device)
    eager_out = merged(**inputs, return_dict=False)[0]
    torch._dynamo.reset()
    merged.compile_repeated_blocks(fullgraph=True)
    out = merged(**inputs, return_dict=False)[0]
    results["regional compile (inductor), width-merged Qwen-Image"] = (out - eager_out).abs().max().item()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the accelerator (default cuda)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    results = {**measure_offload(args.device), **measure_regional_compile(args.device)}
    rows = ["| mode | max abs difference (pixels vs no offload; outputs vs eager) |", "|---|---|"]
    rows += [f"| {k} | {v if isinstance(v, str) else f'{v:.2g}'} |" for k, v in results.items()]
    body = (
        "Tiny FLUX.1 pipeline / transformer, two-span add-on (level b for offload: 2 steps at 16x16).\n\n"
        + "\n".join(rows)
    )
    print(body)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.no_append:
        append(f"Add-on runtime with CPU offload and regional compilation on {args.device} (issue 16)", body)


if __name__ == "__main__":
    main()
