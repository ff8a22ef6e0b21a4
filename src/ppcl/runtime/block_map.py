"""Which base blocks each block of a merged model stands for: the record ``ppcl_blocks.json`` of every merged folder.

A merged model numbers each stack's blocks ``0..M-1``. Position ``j`` of a stack stands for the base blocks
``start_j .. start_{j+1} - 1`` of the same stack (half-open, the last one up to the base stack's end): a kept block for
itself and the blocks removed right after it, a student for its span. So everything keyed on base block indices can
be carried over to the merged model from the folder alone, without the add-on or its plan:

* a base LoRA (:func:`ppcl.runtime.remap_lora_state_dict`): base block ``start_j`` → ``j``, except at student
  positions, which run without the base LoRA in add-on mode too;
* ControlNet residuals (:mod:`ppcl.runtime.controlnet`): position ``j`` adds the residuals of all the base blocks it
  stands for, exactly as the add-on does when the replaced blocks pass their input through and the model adds their
  residuals after them.

The file sits next to diffusers' ``config.json``; diffusers ignores it, so depth-only merges stay stock checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppcl.errors import ArtefactError
from ppcl.io import read_json, write_json
from ppcl.kinds import kind_of
from ppcl.plan import PruningPlan

BLOCKS_FILE = "ppcl_blocks.json"
BLOCKS_FORMAT = "ppcl.block_map"
BLOCKS_FORMAT_VERSION = 1
BLOCK_MAP_ATTR = "ppcl_block_map"
"""Attribute of a merged model holding its :class:`BlockMap`."""


@dataclass(frozen=True)
class StackMap:
    """One stack of a merged model against the same stack of its base.

    Attributes:
        attr: the stack's attribute (``"transformer_blocks"``).
        base_size: number of blocks of this stack in the base model.
        starts: for each merged position, the base (stack-local) index of the block it holds (a student: its span's
            first block); strictly increasing.
        students: the merged positions holding a student.
    """

    attr: str
    base_size: int
    starts: tuple[int, ...]
    students: frozenset[int] = frozenset()

    def source(self, position: int) -> range:
        """The base blocks (stack-local, half-open) merged ``position`` stands for."""
        end = self.starts[position + 1] if position + 1 < len(self.starts) else self.base_size
        return range(self.starts[position], end)

    @property
    def lead(self) -> range:
        """Base blocks removed before the first kept one: no merged position stands for them."""
        return range(0, self.starts[0] if self.starts else self.base_size)

    @property
    def is_identity(self) -> bool:
        """Whether the merged stack is the base stack, block for block."""
        return self.starts == tuple(range(self.base_size))


@dataclass(frozen=True)
class BlockMap:
    """The base blocks behind every block of a merged model (one :class:`StackMap` per stack, execution order), and
    the base's Hub id when it has one."""

    model_class: str
    level: str
    stacks: tuple[StackMap, ...]
    base_model: str | None = None

    @classmethod
    def from_plan(cls, plan: PruningPlan, level: str, base_model: str | None = None) -> BlockMap:
        """The map of the model :func:`~ppcl.runtime.merge` builds for ``level`` of ``plan`` (``base_model``: the
        base's Hub id, if it has one; never a local path)."""
        spec = plan.spec()
        per_stack = spec.check_kept(plan.stack_sizes, plan.kept_blocks(level))
        layout = plan.layout(spec)
        student_starts = {
            layout.locate(rep.blocks()[0]) for rep in plan.replacements_of(level) if kind_of(rep).owns_student
        }
        stacks = []
        for number, (stack, size, local) in enumerate(zip(spec.stacks, plan.stack_sizes, per_stack, strict=True)):
            students = frozenset(j for j, old in enumerate(local) if (number, old) in student_starts)
            stacks.append(StackMap(stack.attr, size, tuple(local), students))
        return cls(plan.model_class, level, tuple(stacks), base_model)

    @property
    def is_identity(self) -> bool:
        """Whether no block was removed."""
        return all(stack.is_identity for stack in self.stacks)

    def stack(self, attr: str) -> StackMap:
        """The :class:`StackMap` of stack ``attr`` (``KeyError`` if the model has no such stack)."""
        for stack in self.stacks:
            if stack.attr == attr:
                return stack
        raise KeyError(attr)

    # ---------------------------------------------------------------------------------------------------- files
    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``ppcl_blocks.json``."""
        return {
            "format": BLOCKS_FORMAT,
            "format_version": BLOCKS_FORMAT_VERSION,
            "model_class": self.model_class,
            "level": self.level,
            "base_model": self.base_model,
            "index_convention": "starts[j] = 0-based index, within the same stack of the base model, of the block "
            "merged position j holds; j stands for base blocks starts[j] .. starts[j+1]-1 (half-open)",
            "stacks": [
                {"attr": s.attr, "base_size": s.base_size, "starts": list(s.starts), "students": sorted(s.students)}
                for s in self.stacks
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> BlockMap:
        """Parse :meth:`to_json` output read from ``where``; malformed records raise :class:`ArtefactError`."""
        if data.get("format") != BLOCKS_FORMAT or int(data.get("format_version", 0)) > BLOCKS_FORMAT_VERSION:
            raise ArtefactError(
                f"{where} is not a block map this ppcl can read",
                expected=f"format {BLOCKS_FORMAT!r} version <= {BLOCKS_FORMAT_VERSION}",
                found=f"{data.get('format')!r} {data.get('format_version')!r}",
                fix="upgrade ppcl, or merge the level again with `ppcl merge`",
            )
        try:
            stacks = tuple(_stack_from_json(entry) for entry in data["stacks"])
            base = data.get("base_model")
            return cls(str(data["model_class"]), str(data["level"]), stacks, None if base is None else str(base))
        except (KeyError, TypeError, ValueError) as err:
            raise ArtefactError(
                f"{where} is malformed",
                expected="`model_class`, `level` and `stacks` of {attr, base_size, increasing starts, students}",
                found=f"{type(err).__name__}: {err}",
                fix="merge the level again with `ppcl merge`",
            ) from err

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``folder/ppcl_blocks.json`` (atomically)."""
        return write_json(self.to_json(), Path(folder) / BLOCKS_FILE)

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> BlockMap:
        """Read ``folder/ppcl_blocks.json`` (``folder`` may also be a pipeline folder with ``transformer/``).

        Raises:
            ArtefactError: no such file (the folder was not written by ``ppcl merge``), or a malformed one.
        """
        path = saved_path(folder)
        if path is None:
            raise ArtefactError(
                f"No {BLOCKS_FILE} in {folder}",
                expected="a merged-model folder written by `ppcl merge` / ppcl.runtime.save_merged",
                found="no block map",
                fix="pass the merged folder, or the add-on's plan and level",
            )
        return cls.from_json(read_json(path, "merged-model block map"), str(path))


def saved_path(folder: str | os.PathLike[str]) -> Path | None:
    """``folder/ppcl_blocks.json`` or ``folder/transformer/ppcl_blocks.json`` if present, else ``None``."""
    for candidate in (Path(folder) / BLOCKS_FILE, Path(folder) / "transformer" / BLOCKS_FILE):
        if candidate.is_file():
            return candidate
    return None


def _stack_from_json(entry: dict[str, Any]) -> StackMap:
    starts = tuple(int(i) for i in entry["starts"])
    size = int(entry["base_size"])
    students = frozenset(int(j) for j in entry.get("students", ()))
    if not _increasing_within(starts, size) or not students <= set(range(len(starts))):
        raise ValueError(f"starts {list(starts)} / students {sorted(students)} for a stack of {size}")
    return StackMap(str(entry["attr"]), size, starts, students)


def _increasing_within(starts: Sequence[int], size: int) -> bool:
    ordered = all(a < b for a, b in zip(starts, starts[1:], strict=False))
    return bool(starts) and ordered and 0 <= starts[0] and starts[-1] < size
