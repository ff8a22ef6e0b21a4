"""Argument helpers shared by the CLI verbs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ppcl.data.loading import DTYPE_CHOICES, QUANTIZE_CHOICES
from ppcl.errors import ConfigError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="transformer or pipeline folder, or a Hub id in the local cache (default: the embedded toy teacher)",
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="model dtype")
    add_quantize_arg(parser)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")


def add_quantize_arg(parser: argparse.ArgumentParser) -> None:
    """``--quantize`` / ``--gguf``: load the base transformer quantised (a frozen teacher or a base to sample from)."""
    parser.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE_CHOICES,
        help="load the base transformer quantised: torchao int8 / fp8 weight-only (CPU or GPU), bitsandbytes nf4 / "
        "bnb8 (GPU); students stay full precision; merge refuses a quantised base",
    )
    parser.add_argument(
        "--gguf",
        default=None,
        metavar="FILE",
        help="read the base transformer's weights from this GGUF file (e.g. a Q4_K_M / Q8_0 conversion; a path, or "
        "owner/name/file.gguf of a Hub repo in the local cache), its config from the model folder; computes in "
        "--dtype; like --quantize: students stay full precision, merge refuses it",
    )


HUB_ARGS = ("pipeline", "model", "addon")
"""Input-folder arguments that may also name a Hub repo already in the local Hugging Face cache."""


def resolve_hub_args(args: argparse.Namespace) -> None:
    """Replace each of :data:`HUB_ARGS` that is a Hub id (not a folder here) by its cached snapshot folder; the CLI
    never downloads (``hf download ID`` first)."""
    from ppcl.hub import is_hub_id, resolve_folder

    for name in HUB_ARGS:
        value = getattr(args, name, None)
        # Only Hub-spelled values: a missing local path is left to the verb, whose own checks come first.
        if isinstance(value, str) and is_hub_id(value) and not Path(value).expanduser().exists():
            setattr(args, name, str(resolve_folder(value, f"--{name}", local_files_only=True)))


def load_model(args: argparse.Namespace) -> Any:
    """The transformer named by ``--model`` (or the toy teacher's), on ``--device`` in ``--dtype``."""
    from ppcl.data.loading import load_transformer, parse_dtype

    device = check_device(args.device)  # before the (possibly large) model loads
    dtype = parse_dtype(args.dtype)
    quantize, gguf = getattr(args, "quantize", "none"), getattr(args, "gguf", None)
    if args.model is None:
        if quantize != "none" or gguf is not None:
            flag = "--gguf" if gguf is not None else "--quantize"
            raise ConfigError(
                f"{flag} needs a real model",
                expected=f"--model (or --pipeline) with {flag}",
                found=f"{flag} {gguf if gguf is not None else quantize} on the toy teacher",
                fix=f"drop {flag} for the toy world",
            )
        from ppcl.toy.teacher import ToyTeacher

        model = ToyTeacher.load(dtype=dtype).transformer
    else:
        model = load_transformer(args.model, dtype, quantize=quantize, gguf=gguf)
    import torch

    if any(p.device != torch.device(device) for p in model.parameters()):  # quantised models may refuse a no-op .to()
        model = model.to(device)
    return model


def parse_floats(text: str, what: str) -> list[float]:
    """``"0.25,0.4"`` → ``[0.25, 0.4]`` with a clear error."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(
            f"cannot parse {what}",
            expected="comma-separated numbers, e.g. 0.25,0.4,0.5",
            found=text,
            fix=f"pass e.g. --{what} 0.25,0.4,0.5",
        ) from exc
    if not values:
        raise ConfigError(
            f"no {what} given", expected="at least one number", found=repr(text), fix=f"pass e.g. --{what} 0.25,0.4,0.5"
        )
    return values


def add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that ppcl wrote as the same kind of artefact (never anything "
        "else; an --out overlapping an input is always refused)",
    )


def check_out(args: argparse.Namespace, kind: Any, *inputs: Any) -> None:
    """Refuse ``args.out`` before any work when the output rules (:mod:`ppcl.outputs`) forbid writing ``kind`` there."""
    from ppcl.outputs import check_output

    check_output(args.out, kind, overwrite=args.overwrite, inputs=inputs)


SEED_LIMIT = 2**32
"""Seeds must lie in ``[0, SEED_LIMIT)``: numpy's range, the narrowest of the RNGs ppcl seeds."""


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """Refuse a zero or negative count among ``args.<name>`` (``None`` means "use the default" and passes)."""
    _require_range(args, names, 1, None, "positive")


def require_non_negative(args: argparse.Namespace, *names: str) -> None:
    """Refuse a negative value among ``args.<name>`` (0 is allowed: "none" / "closed form" / "no protection")."""
    _require_range(args, names, 0, None, "zero or positive")


def require_seed(args: argparse.Namespace, *names: str) -> None:
    """Refuse a seed outside ``[0, 2**32)`` (numpy raises a raw ``ValueError`` on one deep inside a run)."""
    _require_range(args, names, 0, SEED_LIMIT - 1, "a valid seed")


def _require_range(args: argparse.Namespace, names: tuple[str, ...], low: int, high: int | None, what: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and (value < low or (high is not None and value > high)):
            flag = "--" + name.replace("_", "-")
            expected = f"{flag} >= {low}" if high is None else f"{flag} in [{low}, {high}]"
            raise ConfigError(
                f"{flag} must be {what}",
                expected=expected,
                found=str(value),
                fix=f"pass {'a positive' if low else 'a non-negative'} {flag} or leave it at its default",
            )


def check_device(text: str) -> str:
    """``text`` if torch can place tensors there, else a :class:`ConfigError` (a typo or a missing GPU)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ConfigError(
            "unknown --device",
            expected="a torch device such as cpu, cuda or cuda:1",
            found=repr(text),
            fix="pass --device cpu or --device cuda",
        ) from exc
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    count = torch.cuda.device_count() if device.type == "cuda" else 1
    if not available.get(device.type, True) or (device.index is not None and device.index >= count):
        raise ConfigError(
            "the --device is not available on this machine",
            expected="an available device",
            found=f"{text} ({count if device.type == 'cuda' else 0} {device.type} device(s) here)",
            fix="pass --device cpu, or run on a machine with that device",
        )
    return text
