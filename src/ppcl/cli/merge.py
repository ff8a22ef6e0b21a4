"""``ppcl merge``: bake one level of an add-on into a new, smaller model folder.

A depth-only level becomes a stock diffusers folder (loads with ``Class.from_pretrained``, without ppcl). A level with
width replacements also gets ``ppcl_merged.json``, the record of its substitutions (written by
:func:`ppcl.runtime.save_merged`); load it with :func:`ppcl.load_merged`. Every merged folder also gets
``ppcl_blocks.json`` (the base blocks behind each block), which ``ppcl.load_merged`` uses to map ControlNet residuals
and ``ppcl.runtime.remap_lora_state_dict`` to renumber a base LoRA.
"""

from __future__ import annotations

import argparse

from ppcl.cli.common import add_model_args, add_overwrite_arg, check_out, load_model


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "merge",
        help="one level → a standalone smaller model (diffusers folder; width levels add "
        "ppcl_merged.json, load with ppcl.load_merged)",
    )
    p.add_argument("--addon", required=True, help="PruningAddon folder (or a Hub id in the local cache)")
    p.add_argument("--level", required=True, help="level name")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument(
        "--projection-dtype",
        choices=("model", "float32"),
        default="model",
        help="dtype of a width level's linear maps: the model's (default; bf16 models run them in bf16) or float32",
    )
    add_model_args(p)
    add_overwrite_arg(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from ppcl.addon import PruningAddon
    from ppcl.errors import ArtefactError
    from ppcl.io import atomic_folder
    from ppcl.outputs import MERGED, write_marker
    from ppcl.runtime import merge, save_merged
    from ppcl.runtime.merge_width import MERGED_FILE

    check_out(args, MERGED, args.addon, args.model)
    model = load_model(args)
    addon = PruningAddon.from_pretrained(args.addon, model)
    merged = merge(
        model, addon, args.level, projection_dtype=torch.float32 if args.projection_dtype == "float32" else None
    )
    bad = [name for name, p in merged.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:  # a standalone model with NaN weights would only fail later, far from its cause
        raise ArtefactError(
            "the merged model would hold non-finite weights",
            expected="finite values everywhere",
            found=f"NaN/Inf in {bad[:3]} ({len(bad)} tensor(s))",
            fix="check the base model's and the add-on's weights (ppcl inspect), then merge again",
        )
    with atomic_folder(args.out, MERGED, args.overwrite) as tmp:
        # save_merged writes the substitution record only for width levels: depth-only folders stay stock diffusers
        # (the marker and ppcl_blocks.json are small JSON files diffusers ignores; the marker lets a later
        # merge --overwrite recognise the folder).
        save_merged(merged, tmp)
        write_marker(tmp, MERGED)
        width = (tmp / MERGED_FILE).is_file()
    n = sum(p.numel() for p in merged.parameters())
    how = (
        "load with ppcl.load_merged"
        if width
        else "stock diffusers checkpoint; ppcl.load_merged adds the ControlNet map"
    )
    print(f"{args.out}: {type(merged).__name__}, {n / 1e6:.2f}M parameters ({how})")
    return 0
