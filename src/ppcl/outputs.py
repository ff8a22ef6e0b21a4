"""Where ppcl may write: the output rules every writer follows (CLI and Python API).

1. An output that is, contains or lies inside one of the command's inputs is always refused: a command never destroys
   what it reads (``ppcl analyze --out`` equal to, or a parent of, its ``--calibration``).
2. A missing output, or an empty folder, is written.
3. An existing output that ppcl wrote as the same kind of artefact (recognised by its manifest file) is replaced only
   with ``overwrite=True`` (``--overwrite``).
4. Anything else, a user's folder or file or another kind of artefact, is refused: ppcl never deletes what it did not
   create, with or without ``--overwrite``.

Folders without a manifest of their own (a merged depth-only model is a stock diffusers folder, the demo's folder holds
sub-artefacts) carry :data:`OUTPUT_MARKER`, a small JSON file naming the kind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ppcl.errors import ConfigError

OUTPUT_MARKER = "ppcl_output.json"


@dataclass(frozen=True)
class OutputKind:
    """One kind of artefact ppcl writes.

    Attributes:
        name: what the user reads in messages, e.g. ``"calibration set"``.
        manifests: files whose presence makes an existing folder this kind (besides :data:`OUTPUT_MARKER`).
        is_file: the output is one file (a JSON of results, a PNG), not a folder.
        suffixes: for a file output, the suffixes ppcl writes (an existing file with another suffix is not ours).
    """

    name: str
    manifests: tuple[str, ...] = ()
    is_file: bool = False
    suffixes: tuple[str, ...] = ()


CALIBRATION = OutputKind("calibration set", ("calibration.json",))
REPORT = OutputKind("redundancy report", ("report.json",))
PLAN = OutputKind("pruning plan", ("plan.json",))
ADDON = OutputKind("add-on", ("ppcl_addon.json",))
MERGED = OutputKind("merged model", ("ppcl_merged.json",))
LATENT_CACHE = OutputKind("latent cache", ("manifest.json",))
CHECKPOINT = OutputKind("training checkpoint", ("trainer_state.json", "trainer_state.pt"))
DISTILL_RUN = OutputKind("distillation run", ("metrics.jsonl",))
DEMO = OutputKind("demo run", ("results.json",))
JSON_RESULTS = OutputKind("JSON results file", is_file=True, suffixes=(".json",))
IMAGE = OutputKind("image", is_file=True, suffixes=(".png", ".jpg", ".jpeg", ".webp"))


def check_output(
    out: str | os.PathLike[str],
    kind: OutputKind,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> Path:
    """Refuse ``out`` unless the module rules allow writing ``kind`` there; returns ``out`` as a :class:`Path`.

    Raises:
        ConfigError: ``out`` overlaps an input, holds something ppcl did not write as ``kind``, or holds a ``kind``
            artefact and ``overwrite`` is false.
    """
    out = Path(out)
    refuse_overlap(out, inputs)
    if not out.exists() and not out.is_symlink():
        return out
    if kind.is_file:
        _check_file(out, kind, overwrite)
    else:
        _check_folder(out, kind, overwrite)
    return out


def refuse_overlap(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    """Raise :class:`ConfigError` when ``out`` is, contains or lies inside one of ``inputs`` (``None`` skipped)."""
    target = _resolved(Path(out))
    for item in inputs:
        if item is None:
            continue
        source = _resolved(Path(item))
        if target == source or source in target.parents or target in source.parents:
            how = "is" if target == source else ("lies inside" if source in target.parents else "contains")
            raise ConfigError(
                "the output overlaps an input",
                expected="an output folder apart from every input",
                found=f"{out} {how} the input {item}",
                fix="choose an --out outside the inputs (writing it would destroy what is read)",
            )


def is_kind(path: Path, kind: OutputKind) -> bool:
    """True when the existing folder ``path`` is a ppcl artefact of ``kind`` (manifest file or marker)."""
    if any((path / name).is_file() for name in kind.manifests):
        return True
    marker = path / OUTPUT_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("kind") == kind.name
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def write_marker(folder: Path, kind: OutputKind) -> None:
    """Write :data:`OUTPUT_MARKER` naming ``kind`` into ``folder`` (for folders without a manifest of their own)."""
    (folder / OUTPUT_MARKER).write_text(json.dumps({"kind": kind.name, "written_by": "ppcl"}) + "\n", encoding="utf-8")


def _check_folder(out: Path, kind: OutputKind, overwrite: bool) -> None:
    if out.is_symlink() or not out.is_dir():
        raise ConfigError(
            f"the output for the {kind.name} is not a folder ppcl wrote",
            expected=f"a new or empty folder, or a ppcl {kind.name} folder",
            found=f"{out} is a {'symlink' if out.is_symlink() else 'file'}",
            fix="choose another --out (ppcl does not replace what it did not create)",
        )
    if not any(out.iterdir()):
        return
    if not is_kind(out, kind):
        raise ConfigError(
            "the output folder holds files ppcl did not write",
            expected=f"a new or empty folder, or a ppcl {kind.name} folder",
            found=f"{out} is not empty and not a ppcl {kind.name}",
            fix="choose another --out (ppcl does not delete what it did not create)",
        )
    if not overwrite:
        raise ConfigError(
            f"the output folder already holds a ppcl {kind.name}",
            expected="a new or empty folder",
            found=str(out),
            fix="pass --overwrite (overwrite=True) to replace it, or choose another --out",
        )


def _check_file(out: Path, kind: OutputKind, overwrite: bool) -> None:
    ours = out.is_file() and not out.is_symlink() and out.suffix.lower() in kind.suffixes
    if not ours:
        raise ConfigError(
            f"the output for the {kind.name} is not a file ppcl writes",
            expected=f"a new file, or a {'/'.join(kind.suffixes)} file to replace with --overwrite",
            found=f"{out} exists ({_what(out)})",
            fix="choose another --out (ppcl does not replace what it did not create)",
        )
    if not overwrite:
        raise ConfigError(
            f"the {kind.name} already exists",
            expected="a new file",
            found=str(out),
            fix="pass --overwrite to replace it, or choose another --out",
        )


def _what(path: Path) -> str:
    if path.is_symlink():
        return "a symlink"
    if path.is_dir():
        return "a folder"
    return f"a {path.suffix} file" if path.suffix else "a file without suffix"


def _resolved(path: Path) -> Path:
    """``path`` made absolute with symlinks followed (a missing tail is kept as written)."""
    return path.expanduser().resolve(strict=False)
