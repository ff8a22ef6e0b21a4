"""``ppcl demo``: the main job on the embedded toy world.

Until the pruning stages land, the demo loads the committed toy teacher, samples a grid for a few prompts and
scores it with ShapesEval, writing ``report.md``, ``samples.png`` and ``scores.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ppcl.logging import get_logger

log = get_logger("demo")

DEMO_PROMPTS = (
    "a red circle",
    "a blue square",
    "a yellow triangle",
    "a green circle left of a red square",
    "a blue triangle above a yellow circle",
    "a red square and a green triangle",
)


def register(verbs: argparse._SubParsersAction) -> None:
    demo = verbs.add_parser("demo", help="run ppcl end to end on the embedded toy world")
    demo.add_argument("--out", default="ppcl-demo", help="output folder")
    demo.add_argument("--fast", action="store_true", help="a smaller benchmark (smoke test)")
    demo.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ppcl.io import write_json
    from ppcl.toy.benchmark import score_model
    from ppcl.toy.images import make_grid, save_png
    from ppcl.toy.sampler import sample
    from ppcl.toy.teacher import ToyTeacher, load_card

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log.info("demo: loading the committed toy teacher")
    teacher = ToyTeacher.load()
    log.info("demo: sampling %d prompts x 8 seeds", len(DEMO_PROMPTS))
    prompts = [p for p in DEMO_PROMPTS for _ in range(8)]
    grid = make_grid(sample(teacher, prompts, list(range(len(prompts)))), ncols=8, scale=3)
    save_png(grid, out / "samples.png")
    per_category = 10 if args.fast else 60
    log.info("demo: ShapesEval on %d prompts x 2 seeds", 4 * per_category)
    scores = score_model(teacher, n_per_category=per_category)
    write_json(scores, out / "scores.json")
    _write_report(out, scores, load_card(), time.time() - t0)
    log.info("demo: done in %.0f s; report at %s", time.time() - t0, out / "report.md")
    print(out / "report.md")
    return 0


def _write_report(out: Path, scores: dict, card: dict, seconds: float) -> None:
    cfg = card["config"]
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in scores.items() if k != "n_images")
    text = f"""# ppcl demo — toy teacher

Teacher: `QwenImageTransformer2DModel`, {cfg['num_layers']} blocks, width
{cfg['num_attention_heads'] * cfg['attention_head_dim']}, trained {card['train']['steps']} steps
(`{card['command']}`).

## ShapesEval ({scores['n_images']} images)

| metric | score |
|---|---|
{rows}

## Samples (rows: {", ".join(DEMO_PROMPTS)})

![samples](samples.png)

Took {seconds:.0f} s. Raw scores: `scores.json`. Prompts: {json.dumps(list(DEMO_PROMPTS))}.
"""
    tmp = out / "report.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "report.md")
