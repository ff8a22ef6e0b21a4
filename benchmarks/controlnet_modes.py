"""ControlNet residuals in add-on vs merged mode, with and without ppcl's mapping (issue 16), on the tiny real models.

For FLUX.1, Qwen-Image, SD3 and SD3.5 (tiny configs of the real diffusers classes, ``tests/tiny_models.py``): a plan
with spans ``[1:3]`` and ``[3:5]`` (level ``b``), students perturbed from their init, ``L`` random ControlNet
residuals of scale 0.5 per stack (as a ControlNet of ``L`` layers gives them). Reports the largest difference between
the add-on applied to the base and the merged model, with the merged model's ControlNet mapping
(:mod:`ppcl.runtime.controlnet`) and without it (diffusers' own spacing over the merged block count: the old
behaviour). Appends to RESULTS.md unless ``--no-append``. CPU, seconds::

    .venv/bin/python benchmarks/controlnet_modes.py
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _results import append  # noqa: E402
from ppcl.addon import PruningAddon  # noqa: E402
from ppcl.runtime import ControlNetRemap, apply_addon, merge  # noqa: E402
from tiny_models import TinyCase, build_tiny, two_span_plan  # noqa: E402 - the tests' tiny real models

FAMILIES = ("flux", "qwenimage", "sd3", "sd35")
COUNTS = (2, 3, 6)
ARGUMENTS = {
    "flux": ("controlnet_block_samples", "controlnet_single_block_samples"),
    "qwenimage": ("controlnet_block_samples",),
    "sd3": ("block_controlnet_hidden_states",),
    "sd35": ("block_controlnet_hidden_states",),
}
TOKENS = {"flux": 16, "qwenimage": 16, "sd3": 64, "sd35": 64}  # image tokens of the tiny inputs


def _residuals(case: TinyCase, count: int) -> dict[str, list[torch.Tensor]]:
    """``count`` random residuals ``(B, N_img, D)`` per stack, scale 0.5, seeded."""
    g = torch.Generator().manual_seed(5)
    width = case.model.config.num_attention_heads * case.model.config.attention_head_dim
    return {a: [torch.randn(2, TOKENS[case.name], width, generator=g) * 0.5 for _ in range(count)]
            for a in ARGUMENTS[case.name]}  # fmt: skip


def _run(model: torch.nn.Module, inputs: dict, residuals: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    return model(**inputs, **{k: list(v) for k, v in residuals.items()}, return_dict=False)[0]


@torch.no_grad()
def measure(name: str, count: int) -> tuple[float, float]:
    """``(max |add-on − merged| without the mapping, with it)`` for family ``name`` and ``count`` residuals."""
    case = build_tiny(name)
    base, inputs = case.model, case.make_inputs(0)
    addon = PruningAddon.from_plan(base, two_span_plan(base))
    g = torch.Generator().manual_seed(1)
    for p in addon.parameters():  # students that differ from their init, as trained ones do
        p.add_(torch.randn(p.shape, generator=g) * 0.02)
    residuals = _residuals(case, count)
    applied = copy.deepcopy(base)
    apply_addon(applied, addon, "b")
    expected = _run(applied, inputs, residuals)
    merged = merge(base, addon, "b")
    mapped = (_run(merged, inputs, residuals) - expected).abs().max().item()
    for key in [k for k, hook in merged._forward_pre_hooks.items() if isinstance(hook, ControlNetRemap)]:
        del merged._forward_pre_hooks[key]
    unmapped = (_run(merged, inputs, residuals) - expected).abs().max().item()
    return unmapped, mapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    rows = ["| family | residuals L | without the mapping | with it |", "|---|---|---|---|"]
    for name in FAMILIES:
        for count in COUNTS:
            unmapped, mapped = measure(name, count)
            rows.append(f"| {name} | {count} | {unmapped:.3g} | {mapped:.2g} |")
    body = (
        "Max |add-on − merged| of the output, tiny models, level b (spans [1:3], [3:5]), residuals of scale 0.5.\n\n"
        + "\n".join(rows)
    )
    print(body)
    if not args.no_append:
        append("ControlNet residuals: add-on vs merged mode (issue 16)", body)


if __name__ == "__main__":
    main()
