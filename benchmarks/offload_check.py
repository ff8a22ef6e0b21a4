"""CPU offload with an add-on on a real accelerator (issue 16): the check ``tests/test_hooks.py`` can only make with
the CPU as execution device.

On the tiny FLUX.1 pipeline of the tests (``tests/tiny_pipelines.py``) with a perturbed two-span add-on at level
``b``: the images of the pipeline on the device without offload, against ``enable_model_cpu_offload`` (add-on applied
before and after) and ``enable_sequential_cpu_offload`` enabled before the add-on is loaded and applied (students
then live on the device, the base's weights in the hooks). Reports the largest pixel difference of each and whether
enabling sequential offload after applying is refused clearly. Appends to RESULTS.md unless ``--no-append``::

    .venv/bin/python benchmarks/offload_check.py --device cuda
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
from ppcl.runtime import apply_addon  # noqa: E402
from tiny_models import two_span_plan  # noqa: E402
from tiny_pipelines import build_flux  # noqa: E402


def _image(pipe: Any) -> torch.Tensor:
    out = pipe(prompt="a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    return torch.from_numpy(out)


def _addon(root: Path) -> tuple[Path, Path]:
    folder = build_flux(root / "flux")
    base = ppcl.load_pipeline(folder).transformer
    addon = PruningAddon.from_plan(base, two_span_plan(base))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in addon.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    addon.save_pretrained(root / "addon")
    return folder, root / "addon"


def measure(device: str) -> dict[str, Any]:
    """Max |difference| of each offload mode's image against the plain one on ``device``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder, addon = _addon(Path(tmp))
        expected = _image(ppcl.load_pipeline(folder, addon, level="b").to(device))
        results: dict[str, Any] = {}
        pipe = ppcl.load_pipeline(folder, addon, level="b")
        pipe.enable_model_cpu_offload(device=device)
        results["model offload, add-on applied first"] = (_image(pipe) - expected).abs().max().item()
        pipe = ppcl.load_pipeline(folder)
        pipe.enable_model_cpu_offload(device=device)
        apply_addon(pipe.transformer, PruningAddon.from_pretrained(addon, pipe.transformer), "b")
        results["model offload, add-on applied after"] = (_image(pipe) - expected).abs().max().item()
        pipe = ppcl.load_pipeline(folder)
        pipe.enable_sequential_cpu_offload(device=device)
        apply_addon(pipe.transformer, PruningAddon.from_pretrained(addon, pipe.transformer), "b")
        results["sequential offload, add-on applied after"] = (_image(pipe) - expected).abs().max().item()
        pipe = ppcl.load_pipeline(folder, addon, level="b")
        pipe.enable_sequential_cpu_offload(device=device)
        try:
            _image(pipe)
            results["sequential offload enabled after applying"] = "ran (unexpected)"
        except PPCLError as err:
            results["sequential offload enabled after applying"] = f"refused: {str(err).split('.')[0]}"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the accelerator (default cuda)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    results = measure(args.device)
    rows = ["| mode | max abs pixel difference vs no offload |", "|---|---|"]
    rows += [f"| {k} | {v if isinstance(v, str) else f'{v:.2g}'} |" for k, v in results.items()]
    body = "Tiny FLUX.1 pipeline, two-span add-on at level b, 2 steps at 16x16.\n\n" + "\n".join(rows)
    print(body)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.no_append:
        append(f"CPU offload with an add-on on {args.device} (issue 16)", body)


if __name__ == "__main__":
    main()
