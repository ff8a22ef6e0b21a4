"""The PruningPlan artefact: replacements plus ordered, named levels; a folder holding ``plan.json``.

A plan is made by :func:`~ppcl.plan.from_report.plan_from_report` from a redundancy report or written by hand, and is
validated on construction from proposals, on load and on save (see :mod:`ppcl.plan.validate`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppcl.errors import ArtefactError, ConfigError, PPCLError
from ppcl.io import follow_umask
from ppcl.outputs import PLAN as PLAN_KIND
from ppcl.outputs import check_output
from ppcl.plan import _json
from ppcl.plan.level import Level, LevelRef
from ppcl.plan.replacements import Replacement, replacement_from_json
from ppcl.plan.span import BlockLayout, Span

if TYPE_CHECKING:
    from ppcl.arch import ArchSpec
    from ppcl.plan.count import ParamCount

PLAN_FILE = "plan.json"
MAX_STACKS = 8
MAX_STACK_BLOCKS = 1024
FORMAT = "ppcl.pruning_plan"
FORMAT_VERSION = 1
SPAN_CONVENTION = (
    "start/stop are half-open flat block indices [start, stop) like a Python slice over all block stacks in order; "
    "inclusive [u, v] is the paper's notation of the same blocks (u = start, v = stop - 1); default ids read "
    "depth:<start>-<stop>"
)


@dataclass
class PruningPlan:
    """Replacements of one model architecture and the named levels that switch them on.

    Attributes:
        arch: ArchSpec name (``"qwenimage"``, ``"flux"``, ``"sd3"``).
        model_class: diffusers class name of the base transformer.
        stack_sizes: blocks per stack of the base model (flat indices run over them in order).
        replacements: every replacement any level may use.
        levels: named levels, in order (proposals list them cheapest-first and nested; hand-made plans may differ).
        protect_first: the first this-many flat blocks may not be inside a depth span.
        protect_last: the last this-many flat blocks may not be inside a depth span.
        provenance: where the plan comes from (selector, report, targets...), free-form JSON.
        notes: warnings and remarks for humans (e.g. a target that could not be reached).
    """

    arch: str
    model_class: str
    stack_sizes: tuple[int, ...]
    replacements: list[Replacement] = field(default_factory=list)
    levels: list[Level] = field(default_factory=list)
    protect_first: int = 2
    protect_last: int = 2
    provenance: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stack_sizes = tuple(self.stack_sizes)
        self.replacements = list(self.replacements)
        self.levels = list(self.levels)
        self.notes = list(self.notes)

    # ------------------------------------------------------------------------------------------------ structure
    @property
    def num_blocks(self) -> int:
        """Number of flat blocks of the base model."""
        return sum(self.stack_sizes)

    @property
    def level_names(self) -> list[str]:
        """Level names in plan order."""
        return [lvl.name for lvl in self.levels]

    def spec(self) -> ArchSpec:
        """The ArchSpec named by :attr:`arch` (raises :class:`~ppcl.errors.ConfigError` if unknown)."""
        from ppcl.arch import spec_by_name

        try:
            return spec_by_name(self.arch)
        except PPCLError as err:
            raise ConfigError(
                f"The plan's architecture {self.arch!r} is unknown",
                expected=err.expected,
                found=err.found,
                fix="set `arch` to a supported architecture name",
            ) from err

    def protected_blocks(self, spec: ArchSpec | None = None) -> list[int]:
        """Flat indices no depth span may cover: first/last protected blocks (+ SD3's last block)."""
        spec = spec or self.spec()
        total = self.num_blocks
        protected = set(range(min(self.protect_first, total))) | set(range(max(total - self.protect_last, 0), total))
        if spec.protect_last_block and total:
            protected.add(total - 1)
        return sorted(protected)

    def layout(self, spec: ArchSpec | None = None) -> BlockLayout:
        """The flat depth axis of the base model, with stack names and protected blocks."""
        spec = spec or self.spec()
        return BlockLayout.of(self.stack_sizes, spec, self.protected_blocks(spec))

    def describe(self, span: Span) -> str:
        """Stack-local code-convention name of ``span`` (e.g. ``single_transformer_blocks[1:3]``)."""
        return self.layout().describe(span)

    # ------------------------------------------------------------------------------------------------- lookups
    def level(self, name: str) -> Level:
        """The level called ``name``; unknown names raise :class:`~ppcl.errors.PPCLError` listing the known ones."""
        for lvl in self.levels:
            if lvl.name == name:
                return lvl
        raise ConfigError(
            f"The plan has no level {name!r}",
            expected=f"one of {self.level_names}",
            found=repr(name),
            fix="pick an existing level name (or None for the original model)",
        )

    def replacement(self, replacement_id: str) -> Replacement:
        """The replacement with ``replacement_id``."""
        for rep in self.replacements:
            if rep.id == replacement_id:
                return rep
        raise ConfigError(
            f"The plan has no replacement {replacement_id!r}",
            expected=f"one of {[r.id for r in self.replacements]}",
            found=repr(replacement_id),
        )

    def _resolve(self, level: LevelRef) -> Level | None:
        return self.level(level) if isinstance(level, str) else level

    def replacements_of(self, level: LevelRef) -> list[Replacement]:
        """The replacements active at ``level``, in the level's order (``None`` → none)."""
        lvl = self._resolve(level)
        return [] if lvl is None else [self.replacement(i) for i in lvl.replacement_ids]

    def removed_blocks(self, level: LevelRef) -> list[int]:
        """Sorted flat indices of the blocks a merged model of ``level`` no longer has."""
        return sorted({i for rep in self.replacements_of(level) for i in rep.removed_blocks()})

    def kept_blocks(self, level: LevelRef) -> list[int]:
        """Sorted flat indices of the blocks a merged model of ``level`` keeps (input to ``spec.rewrite_config``)."""
        removed = set(self.removed_blocks(level))
        return [i for i in range(self.num_blocks) if i not in removed]

    # ------------------------------------------------------------------------------------------ validation, size
    def validate(self, spec: ArchSpec | None = None) -> PruningPlan:
        """Check the plan (see :func:`ppcl.plan.validate.validate_plan`); returns ``self``.

        Raises:
            ConfigError: the first violation, naming the replacement and the level concerned.
        """
        from ppcl.plan.validate import validate_plan

        validate_plan(self, spec)
        return self

    def param_count(self, model_config: Mapping[str, Any], level: LevelRef = None) -> ParamCount:
        """Parameters of the base model built from ``model_config`` and of ``level`` (meta device, no memory)."""
        from ppcl.plan.count import param_count

        return param_count(self.model_class, model_config, plan=self, level=level)

    def block_param_fraction(self, level: LevelRef, model_config: Mapping[str, Any] | None = None) -> float:
        """Fraction of *block* parameters ``level`` removes.

        Block sizes come from ``model_config`` (built on the meta device) or, when omitted, from the per-block
        parameter counts a proposal recorded in ``provenance["per_block_params"]``.
        """
        from ppcl.plan.count import ParamTable, block_param_fraction

        if model_config is not None:
            return self.param_count(model_config, level).block_fraction_removed
        recorded = self.provenance.get("per_block_params")
        if not isinstance(recorded, list) or len(recorded) != self.num_blocks:
            raise ConfigError(
                "The plan does not record per-block parameter counts",
                expected=f"provenance.per_block_params with {self.num_blocks} entries",
                found=repr(recorded)[:80],
                fix="pass model_config (the base model's config)",
            )
        table = ParamTable.from_per_block(recorded, self.stack_sizes)
        return block_param_fraction(table, self.replacements_of(level))

    def summary(self) -> str:
        """Multi-line human description of the replacements and levels."""
        layout = self.layout()
        lines = [
            f"PruningPlan for {self.model_class} ({self.arch}), {self.num_blocks} blocks {list(self.stack_sizes)},"
            f" protected flat blocks {self.protected_blocks()}"
        ]
        lines += [f"  {rep.describe(layout)}" for rep in self.replacements]
        for lvl in self.levels:
            kept = self.num_blocks - len(self.removed_blocks(lvl))
            text = lvl.description or f"{len(lvl.replacement_ids)} replacements, {self.num_blocks} → {kept} blocks"
            scores = lvl.score_text()
            lines.append(f"  level {lvl.name}: {text}" + (f"; {scores}" if scores else ""))
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``plan.json``."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "span_convention": SPAN_CONVENTION,
            "arch": self.arch,
            "model_class": self.model_class,
            "stack_sizes": list(self.stack_sizes),
            "protect_first": self.protect_first,
            "protect_last": self.protect_last,
            "replacements": [rep.to_json() for rep in self.replacements],
            "levels": [lvl.to_json() for lvl in self.levels],
            "notes": list(self.notes),
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, data: Any, *, validate: bool = True) -> PruningPlan:
        """Inverse of :meth:`to_json`.

        Raises:
            ArtefactError: a field is missing or has the wrong type (named by its JSON path).
            ConfigError: the plan is well-formed but invalid (see :meth:`validate`).
        """
        obj = _json.object_at(data, "plan")
        fmt = _json.optional(obj, "format", str, "", FORMAT)
        version = _json.optional(obj, "format_version", int, "", FORMAT_VERSION)
        if fmt != FORMAT or version > FORMAT_VERSION:
            raise ArtefactError(
                "This is not a plan this ppcl version can read",
                expected=f"format {FORMAT!r} version <= {FORMAT_VERSION}",
                found=f"format {fmt!r} version {version}",
                fix="upgrade ppcl or check the file",
            )
        sizes = _json.require(obj, "stack_sizes", list, "")
        stack_sizes = tuple(_json.check(s, int, f"stack_sizes[{i}]") for i, s in enumerate(sizes))
        if not 1 <= len(stack_sizes) <= MAX_STACKS or not all(1 <= s <= MAX_STACK_BLOCKS for s in stack_sizes):
            # Validation walks every block: a 200-byte file declaring 1e9 blocks must not take unbounded memory.
            raise ArtefactError(
                "Plan field `stack_sizes` is out of range",
                expected=f"1 to {MAX_STACKS} stacks of 1 to {MAX_STACK_BLOCKS} blocks (the largest "
                "supported DiTs have about 60 per stack)",
                found=repr(sizes)[:80],
                fix="correct the field: it is the base model's blocks per stack",
            )
        plan = cls(
            arch=_json.require(obj, "arch", str, ""),
            model_class=_json.require(obj, "model_class", str, ""),
            stack_sizes=stack_sizes,
            replacements=[
                replacement_from_json(r, f"replacements[{i}]")
                for i, r in enumerate(_json.require(obj, "replacements", list, ""))
            ],
            levels=[
                Level.from_json(lvl, f"levels[{i}]") for i, lvl in enumerate(_json.require(obj, "levels", list, ""))
            ],
            protect_first=_json.optional(obj, "protect_first", int, "", 2),
            protect_last=_json.optional(obj, "protect_last", int, "", 2),
            provenance=dict(_json.optional(obj, "provenance", dict, "", {})),
            notes=[
                _json.check(n, str, f"notes[{i}]") for i, n in enumerate(_json.optional(obj, "notes", list, "", []))
            ],
        )
        return plan.validate() if validate else plan

    def save(self, folder: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Validate, then write ``folder/plan.json`` atomically (temp file + ``os.replace``); returns its path.

        An existing plan is replaced only with ``overwrite``; a non-empty folder without one is refused
        (:mod:`ppcl.outputs`).
        """
        self.validate()
        out = check_output(folder, PLAN_KIND, overwrite=overwrite)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtefactError(
                "cannot create the plan folder",
                expected="a writable location",
                found=f"{out}: {exc.strerror}",
                fix="choose another --out",
            ) from exc
        path = out / PLAN_FILE
        text = _json.dumps(self.to_json())
        # A crash mid-write leaves the old plan.json untouched: readers only ever see a complete file.
        try:
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{PLAN_FILE}.", suffix=".tmp")
            follow_umask(Path(tmp))
        except OSError as exc:
            raise ArtefactError(
                "cannot write into the plan folder",
                expected="a writable folder",
                found=f"{out}: {exc.strerror}",
                fix="choose another --out or fix its permissions",
            ) from exc
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:  # disk full or read-only while writing: the old plan.json stays as it was
            raise ArtefactError(
                "cannot write the plan",
                expected="a writable location with free space",
                found=f"{path}: {exc.strerror or exc}",
                fix="free some space, fix the permissions or choose another --out",
            ) from exc
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path_or_folder: str | os.PathLike[str]) -> PruningPlan:
        """Read and validate a plan from a folder holding ``plan.json`` or from the JSON file itself.

        Raises:
            ArtefactError: the file is missing or malformed.
            ConfigError: the plan is invalid; the message starts with the file's path.
        """
        path = Path(path_or_folder)
        if path.is_dir():
            path = path / PLAN_FILE
        if not path.is_file():
            raise ArtefactError(
                f"No pruning plan at {path}",
                expected=f"a folder holding {PLAN_FILE} (or the file)",
                found="nothing" if not path.exists() else "not a file",
                fix="run `ppcl plan` first, or pass the right folder",
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtefactError(
                f"{path} is not valid JSON",
                expected="a JSON object as written by PruningPlan.save",
                found=str(err),
                fix="fix the syntax at the position given",
            ) from err
        try:
            return cls.from_json(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err.what}", expected=err.expected, found=err.found, fix=err.fix) from err
        except ArtefactError as err:
            raise ArtefactError(f"{path}: {err.what}", expected=err.expected, found=err.found, fix=err.fix) from err
