"""``ppcl merge``: bake one level of an add-on into a new, smaller stock diffusers model folder."""

from __future__ import annotations

import argparse

from ppcl.cli.common import add_model_args, load_model


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("merge", help="one level → a standalone smaller model (diffusers save_pretrained)")
    p.add_argument("--addon", required=True, help="PruningAddon folder")
    p.add_argument("--level", required=True, help="level name")
    p.add_argument("--out", required=True, help="output model folder")
    add_model_args(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ppcl.addon import PruningAddon
    from ppcl.io import atomic_folder
    from ppcl.runtime import merge

    model = load_model(args)
    addon = PruningAddon.from_pretrained(args.addon, model)
    merged = merge(model, addon, args.level)
    with atomic_folder(args.out) as tmp:
        merged.save_pretrained(str(tmp))
    n = sum(p.numel() for p in merged.parameters())
    print(f"{args.out}: {type(merged).__name__}, {n / 1e6:.2f}M parameters")
    return 0
