"""The ``ppcl`` command: one sub-command per verb, each in its own module.

A :class:`~ppcl.errors.PPCLError` ends the command with exit code 2 and a one-line message, no traceback; Ctrl-C
ends it with one line and exit code 130 (every writer is atomic and a run keeps its last checkpoint, so the state on
disk is consistent; a distillation run continues with ``--resume``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ppcl.cli.common import resolve_hub_args
from ppcl.errors import PPCLError
from ppcl.logging import configure_logging


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help already says what its default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """The CLI's parsers (every verb's too: subparsers are made with the parent's class): defaults shown in --help."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    from ppcl.cli import (
        analyze,
        cache,
        calibrate,
        demo,
        distill,
        eval_,
        generate,
        inspect_,
        merge,
        plan,
        push,
        toy,
    )

    parser = _Parser(prog="ppcl", description="Pluggable Pruning with Contiguous Layer Distillation")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in (demo, calibrate, cache, analyze, plan, distill, merge, generate, eval_, inspect_, push, toy):
        module.register(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ppcl`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(-1 if args.quiet else args.verbose)
    try:
        resolve_hub_args(args)
        return int(args.func(args) or 0)
    except PPCLError as exc:
        print(f"ppcl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "ppcl: interrupted (Ctrl-C); nothing partial was written: outputs appear only when complete, and a "
            "distillation run continues from its last checkpoint with --resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
