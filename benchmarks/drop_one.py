"""How redundant is a toy teacher? ShapesEval with one block removed (untrained: the block becomes the identity).

The method presumes that removing one or a few blocks of a DiT barely hurts (true for Qwen-Image). This measures it
on a toy teacher: for every dual-stream block ``i`` the teacher is sampled with block ``i`` skipped and scored with the
robust and the strict ShapesEval on the same prompts and noise as the teacher itself. Appends one table to
benchmarks/RESULTS.md: per block, both scores and the relative drop from the teacher's.

    python benchmarks/drop_one.py                                # the committed teacher
    python benchmarks/drop_one.py --teacher /work/runs/teacher24 --per-category 10
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from tqdm import tqdm

from _results import append
from ppcl.toy.benchmark import score_model
from ppcl.toy.teacher import ToyTeacher, load_card


@contextlib.contextmanager
def without_block(transformer: torch.nn.Module, index: int) -> Iterator[None]:
    """``transformer`` with dual-stream block ``index`` skipped (its residual stream passes through unchanged)."""
    blocks = transformer.transformer_blocks
    transformer.transformer_blocks = torch.nn.ModuleList([b for j, b in enumerate(blocks) if j != index])
    try:
        yield
    finally:
        transformer.transformer_blocks = blocks


def drop_one_rows(teacher: ToyTeacher, per_category: int, blocks: list[int]) -> list[dict[str, Any]]:
    """One row per removed block (``None`` first: the teacher itself) with robust and strict ShapesEval."""
    rows = []
    for index in tqdm([None, *blocks], desc="drop one block"):
        if index is None:
            scores = score_model(teacher, n_per_category=per_category)
        else:
            with without_block(teacher.transformer, index):
                scores = score_model(teacher, n_per_category=per_category)
        rows.append({"block": index, "robust": scores["overall"], "strict": scores["strict"]["overall"]})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    ref = rows[0]
    lines = ["| block removed | robust | drop | strict | drop |", "|---|---|---|---|---|"]
    for row in rows:
        name = "none (teacher)" if row["block"] is None else str(row["block"])
        drops = [f"{1 - row[k] / ref[k]:.1%}" if row["block"] is not None else "" for k in ("robust", "strict")]
        lines.append(f"| {name} | {row['robust']:.3f} | {drops[0]} | {row['strict']:.3f} | {drops[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--teacher", default=None, help="a folder saved by `ppcl toy train-teacher` (default: the committed teacher)"
    )
    parser.add_argument("--per-category", type=int, default=10, help="ShapesEval prompts per category (x 2 seeds)")
    parser.add_argument("--blocks", default=None, help="comma-separated block indices (default: every block)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    teacher = ToyTeacher.load(args.teacher)
    n_blocks = len(teacher.transformer.transformer_blocks)
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else list(range(n_blocks))
    rows = drop_one_rows(teacher, args.per_category, blocks)
    config = load_card(args.teacher)["config"]
    width = config["num_attention_heads"] * config["attention_head_dim"]
    body = (
        f"Teacher: {args.teacher or 'the committed toy teacher'} ({n_blocks} blocks, width {width}); one block "
        f"skipped at a time, no training; ShapesEval {args.per_category} prompts per category x 2 seeds "
        f"({8 * args.per_category} images), teacher and every row on the same prompts and noise.\n\n" + table(rows)
    )
    print(body)
    if not args.no_append:
        append(f"Drop-one-block redundancy of a toy teacher ({n_blocks} blocks)", body)


if __name__ == "__main__":
    main()
