"""The PruningAddon artefact: one student block per depth replacement of a plan, residual linear projections for its
width replacements, plus what the base model must be.

Example::

    addon = PruningAddon.from_plan(transformer, plan)           # students = copies of teacher blocks (+ projections)
    ...                                                          # ppcl distill trains addon.parameters()
    addon.save_pretrained("runs/addon")                          # ppcl_addon.json + .safetensors + README.md
    addon = PruningAddon.from_pretrained("runs/addon", transformer)

A student is the same class as the teacher block it replaces (e.g. ``QwenImageTransformerBlock``) and is called with
exactly the arguments that block receives, so it maps the span's input ``(B, N_img, D)`` / ``(B, N_txt, D)`` streams
to the span's output in the block's own output order. A projection (text run / FFN block, see
:mod:`ppcl.addon.projections`) maps ``(..., D)`` tokens to ``(..., D)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppcl.addon.blocks import averaged_block_copy, block_state, plain_block_copy
from ppcl.addon.card import model_card
from ppcl.addon.fingerprint import check_fingerprint, fingerprint_of
from ppcl.addon.manifest import (
    ADDON_FILE,
    CARD_FILE,
    FORMAT,
    WEIGHTS_FILE,
    check_format,
    check_plan_kinds,
    depth_replacements,
    level_summaries,
    manifest_version,
    ppcl_version,
    student_entry,
)
from ppcl.addon.projections import (
    expected_projections,
    few_keys,
    fresh_projections,
    load_projections,
    projection_entries,
)
from ppcl.addon.sharing import push_addon
from ppcl.arch import ArchSpec, get_spec
from ppcl.errors import AddonMismatchError, ArtefactError, ConfigError
from ppcl.hub import resolve_folder
from ppcl.io import atomic_folder, load_tensors, read_json, save_tensors, write_json
from ppcl.kinds import kind_of, student_key
from ppcl.outputs import ADDON as ADDON_KIND
from ppcl.plan import DepthReplacement, PruningPlan

_INITS = ("first", "middle", "last", "average")


@dataclass(eq=False)
class PruningAddon:
    """Student blocks and width projections for the replacements of ``plan``, with the fingerprint of the base model.

    Attributes:
        plan: the plan (replacements and levels); its depth replacements' ``init`` says which teacher block each
            student copies and therefore its structure.
        students: every trainable module, by key: ``student_key(rep.id)`` → a block of the teacher's block class at
            the span start (depth replacements); ``"<student_key(rep.id)>__<part>"`` → a ``ResidualLinear``
            projection (width replacements, e.g. ``text_50_60__in_51``, ``text_50_60__out``, ``ffn_2__image``).
        fingerprint: see :func:`~ppcl.addon.fingerprint.fingerprint_of`.
        provenance: how the add-on was made (training config, data, steps...), free-form JSON.
        metrics: measured quality, free-form JSON; ``{level: {metric: value}}`` renders as a table in the card.
    """

    plan: PruningPlan
    students: nn.ModuleDict
    fingerprint: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------------ creation
    @classmethod
    def from_plan(cls, model: nn.Module, plan: PruningPlan, init: str | None = None) -> PruningAddon:
        """One fresh student per depth replacement (a detached copy of the teacher block its ``init`` names) and
        identity projections (``W = 0``, ``b = 0``, float32) for every text run and FFN-to-linear replacement.

        Args:
            model: the base transformer (left unchanged; an add-on may already be applied to it).
            plan: a plan made for ``model``.
            init: ``"first" | "middle" | "last"`` for every depth replacement, overriding the plan's choice (the add-on's
                plan records the override, so reloading rebuilds the same structure).

        Raises:
            AddonMismatchError: the plan was made for another architecture, class or block count.
            ConfigError: the plan is invalid, ``init`` is unknown or holds replacements add-ons cannot hold yet.
        """
        spec = check_plan_fits(model, plan)
        if init is not None:
            if init not in _INITS:
                raise ConfigError(
                    f"Unknown student initialisation {init!r}", expected=f"one of {_INITS} or None", found=repr(init)
                )
            plan = dataclasses.replace(
                plan,
                replacements=[
                    dataclasses.replace(r, init=init) if kind_of(r).owns_student else r for r in plan.replacements
                ],
            ).validate(spec)
        students = nn.ModuleDict()
        for rep in _depth_with_unique_keys(plan):
            sources = [spec.block(model, i) for i in rep.init_blocks]
            student = plain_block_copy(sources[0]) if len(sources) == 1 else averaged_block_copy(sources)
            student.requires_grad_(True)
            students[student_key(rep.id)] = student
        students.update(fresh_projections(model, plan))
        provenance = {"created_by": "PruningAddon.from_plan", "ppcl_version": ppcl_version(), "init_override": init}
        return cls(plan, students, fingerprint_of(model, plan), provenance, {})

    # -------------------------------------------------------------------------------------------------- access
    @property
    def level_names(self) -> list[str]:
        """The plan's level names, in order."""
        return self.plan.level_names

    def projections(self, replacement_id: str) -> dict[str, nn.Module]:
        """The projections of width replacement ``replacement_id``: part (``"in_<j>"``, ``"out"``, a stream) → module."""
        keys = [k for k, rep in expected_projections(self.plan).items() if rep.id == replacement_id]
        if not keys:
            raise ConfigError(
                f"The add-on has no projections for {replacement_id!r}",
                expected=f"a width replacement id, one of "
                f"{sorted({r.id for r in expected_projections(self.plan).values()})}",
                found=repr(replacement_id),
            )
        return {key.rsplit("__", 1)[-1]: self.students[key] for key in keys}

    def student(self, replacement_id: str) -> nn.Module:
        """The student of replacement ``replacement_id``."""
        key = student_key(replacement_id)
        if key not in self.students:
            raise ConfigError(
                f"The add-on has no student for {replacement_id!r}",
                expected=f"one of {[r.id for r in self.plan.replacements]}",
                found=repr(replacement_id),
            )
        return self.students[key]

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The students' and projections' parameters (what the distillation optimiser gets)."""
        return self.students.parameters(recurse)

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """``("<module key>.<param>", parameter)`` pairs, named as in the saved safetensors file."""
        return self.students.named_parameters(prefix=prefix, recurse=recurse)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached tensors keyed ``"<module key>.<param>"`` (parameters and persistent buffers)."""
        return {f"{key}.{name}": value for key, s in self.students.items() for name, value in block_state(s).items()}

    def to(self, *args: Any, **kwargs: Any) -> PruningAddon:
        """Move/cast the students in place (parameter objects are kept, so optimisers stay valid); returns self."""
        self.students.to(*args, **kwargs)
        return self

    def fingerprint_of(self, model: nn.Module) -> dict[str, Any]:
        """Fingerprint of ``model`` over the blocks this add-on's plan touches."""
        return fingerprint_of(model, self.plan)

    def check_base(self, model: nn.Module) -> None:
        """Raise :class:`~ppcl.errors.AddonMismatchError` naming the field (expected, found) where ``model`` differs."""
        check_plan_fits(model, self.plan)
        check_fingerprint(self.fingerprint, fingerprint_of(model, self.plan))

    # ------------------------------------------------------------------------------------------------------ I/O
    def manifest(self) -> dict[str, Any]:
        """The JSON object written to ``ppcl_addon.json``."""
        check_plan_kinds(self.plan)
        projections = projection_entries(self.plan, self.students)
        return {
            "format": FORMAT,
            "format_version": manifest_version(bool(projections)),
            "ppcl_version": ppcl_version(),
            "arch": self.plan.arch,
            "base_model_class": self.plan.model_class,
            "fingerprint": self.fingerprint,
            "plan": self.plan.to_json(),
            "levels": level_summaries(self.plan, self.fingerprint.get("config")),
            "students": {
                student_key(r.id): student_entry(self.plan, r, self.students[student_key(r.id)])
                for r in depth_replacements(self.plan)
            },
            "projections": projections,
            "provenance": self.provenance,
            "metrics": self.metrics,
        }

    def save_pretrained(self, folder: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the add-on folder atomically: manifest, safetensors weights and a README.md model card.

        An existing add-on folder is replaced only with ``overwrite``; any other existing folder is refused
        (:mod:`ppcl.outputs`).
        """
        manifest = self.manifest()
        with atomic_folder(folder, ADDON_KIND, overwrite) as tmp:
            write_json(manifest, tmp / ADDON_FILE)
            save_tensors(
                self.state_dict(),
                tmp / WEIGHTS_FILE,
                metadata={"format": "pt", "ppcl_format": FORMAT, "format_version": str(manifest["format_version"])},
            )
            (tmp / CARD_FILE).write_text(model_card(manifest), encoding="utf-8")
        return Path(folder)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload PPCL pruning add-on",
        create_pr: bool = False,
        license: str | None = None,
    ) -> str:
        """Upload this add-on to the Hub model repo ``repo_id`` (created if needed) with a card that loads it by id;
        returns the commit URL. See :func:`ppcl.addon.sharing.push_addon` for the arguments."""
        return push_addon(
            self,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            license=license,
        )

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike[str],
        model: nn.Module,
        *,
        revision: str | None = None,
        local_files_only: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
    ) -> PruningAddon:
        """Load an add-on saved by :meth:`save_pretrained` (or pushed with :meth:`push_to_hub`) for the base
        transformer ``model``.

        Students are rebuilt by copying ``model``'s init blocks (so they get its dtype and device), projections from
        the shapes the manifest records (on their block's device, in their saved dtype); then the saved weights load
        strictly. ``model`` is not changed; call :func:`ppcl.runtime.apply_addon` to use it.

        Args:
            folder: a local add-on folder, or a Hub repo id (``owner/name``) resolved through the local Hugging Face
                cache (:func:`ppcl.hub.resolve_folder`; a local folder of the same name wins).
            model: the base transformer.
            revision: the Hub revision (branch, tag or commit; default ``main``).
            local_files_only: never reach the network (default); ``False`` lets ``huggingface_hub`` download.
            cache_dir: the Hugging Face cache (default ``HF_HUB_CACHE``).
            token: for private Hub repos.

        Raises:
            ArtefactError: missing/malformed/truncated files, a newer format version, projections recorded for other
                keys than the plan needs, missing or extra weights (the keys are named); a Hub id not in the cache.
            AddonMismatchError: ``model`` is not the base the add-on was made for (checked before any weight loads).
        """
        folder = resolve_folder(
            folder, "add-on", revision=revision, local_files_only=local_files_only, cache_dir=cache_dir, token=token
        )
        manifest = read_json(folder / ADDON_FILE, "add-on manifest")
        check_format(manifest, str(folder / ADDON_FILE))
        plan = PruningPlan.from_json(manifest["plan"])
        spec = check_plan_fits(model, plan)
        check_fingerprint(manifest["fingerprint"], fingerprint_of(model, plan))
        tensors = load_tensors(folder / WEIGHTS_FILE, "add-on")
        bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        if bad:  # a diverged run's weights would make every level of the model NaN: never load them silently
            raise ArtefactError(
                "the add-on holds non-finite weights",
                expected="finite values in every tensor",
                found=f"NaN/Inf in {bad[:3]}{' ...' if len(bad) > 3 else ''} ({len(bad)} tensor(s))",
                fix="re-train from the last good checkpoint (ppcl distill --resume with a lower --lr)",
            )
        projections = load_projections(
            spec, model, plan, manifest.get("projections"), tensors, str(folder / ADDON_FILE)
        )
        students = _load_modules(spec, model, plan, projections, tensors, folder / WEIGHTS_FILE)
        return cls(
            plan,
            students,
            dict(manifest["fingerprint"]),
            dict(manifest.get("provenance") or {}),
            dict(manifest.get("metrics") or {}),
        )

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        n_proj = len(expected_projections(self.plan))
        return (
            f"PruningAddon({self.plan.model_class}, {len(self.students) - n_proj} students, {n_proj} projections, "
            f"{n:,} params, "
            f"levels={self.level_names})"
        )


def check_plan_fits(model: nn.Module, plan: PruningPlan) -> ArchSpec:
    """The model's ArchSpec after checking ``plan`` was made for ``model`` (arch, class, stack sizes) and is valid."""
    spec = get_spec(model)
    in_mro = plan.model_class in {c.__name__ for c in type(model).__mro__}
    for field_name, want, have in (
        ("arch", plan.arch, spec.name),
        ("class", plan.model_class, plan.model_class if in_mro else type(model).__name__),
        ("stack_sizes", list(plan.stack_sizes), spec.stack_sizes(model)),
    ):
        if want != have:
            raise AddonMismatchError(
                f"The plan was made for another base model: `{field_name}` differs",
                expected=f"{field_name} = {want!r}",
                found=f"{field_name} = {have!r}",
                fix="use the plan/add-on made for this transformer (same checkpoint and config)",
            )
    plan.validate(spec)
    return spec


def _depth_with_unique_keys(plan: PruningPlan) -> list[DepthReplacement]:
    """The depth replacements, after checking that no two modules of the add-on (students or projections) share a key."""
    owners: dict[str, str] = {}
    keyed = [(student_key(r.id), r.id) for r in depth_replacements(plan)]
    keyed += [(key, rep.id) for key, rep in expected_projections(plan).items()]
    for key, rep_id in keyed:
        if key in owners:
            raise ConfigError(
                f"Replacement ids {owners[key]!r} and {rep_id!r} map to the same module key {key!r}",
                expected="ids that differ in letters, digits or underscores",
                found=f"{owners[key]!r}, {rep_id!r}",
                fix="rename one of the replacements",
            )
        owners[key] = rep_id
    return depth_replacements(plan)


def _load_modules(
    spec: ArchSpec,
    model: nn.Module,
    plan: PruningPlan,
    projections: dict[str, nn.Module],
    tensors: dict[str, torch.Tensor],
    path: Path,
) -> nn.ModuleDict:
    students = nn.ModuleDict()
    for rep in _depth_with_unique_keys(plan):
        # The saved weights overwrite everything, so merged adapters on the base do not matter here.
        students[student_key(rep.id)] = plain_block_copy(spec.block(model, rep.init_block), allow_merged_adapters=True)
    students.update(projections)
    expected = {f"{key}.{name}": value for key, s in students.items() for name, value in s.state_dict().items()}
    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise ArtefactError(
            f"{path} does not hold the add-on's student and projection weights",
            expected=f"{len(expected)} tensors named '<module key>.<param>'",
            found=f"missing {few_keys(missing)}, unexpected {few_keys(extra)}",
            fix="re-save the add-on; do not mix weight files of different add-ons",
        )
    wrong = [k for k, v in expected.items() if tuple(v.shape) != tuple(tensors[k].shape)]
    if wrong:
        raise ArtefactError(
            f"{path} has student weights of the wrong shape",
            expected=str({k: list(expected[k].shape) for k in wrong[:3]}),
            found=str({k: list(tensors[k].shape) for k in wrong[:3]}),
            fix="re-save the add-on for this base model",
        )
    for key, module in students.items():
        prefix = key + "."
        # Keys of one module are prefixes of no other module's keys: `text_1_5__in_2.` never starts `text_1_5__in_21.`.
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
        module.requires_grad_(True)
    return students
