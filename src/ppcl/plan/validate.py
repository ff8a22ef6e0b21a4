"""Validation of a :class:`~ppcl.plan.plan.PruningPlan`: every rule, one :class:`~ppcl.errors.ConfigError` each.

Rules: the architecture is known and matches the stack sizes; protection counts are sane; replacement ids and level
names are unique; each replacement is valid on the model's block layout (depth spans: in range, at least 2 blocks,
inside one stack, no protected block); each level references existing replacements that do not conflict (depth spans
of one level must not overlap). Messages name the replacement and the level(s) concerned.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from ppcl.errors import ConfigError

if TYPE_CHECKING:
    from ppcl.arch import ArchSpec
    from ppcl.plan.plan import PruningPlan


def validate_plan(plan: PruningPlan, spec: ArchSpec | None = None) -> None:
    """Raise :class:`~ppcl.errors.ConfigError` for the first rule ``plan`` breaks.

    ``spec`` defaults to the ArchSpec named by ``plan.arch``.
    """
    spec = spec or plan.spec()
    _check_header(plan, spec)
    _check_unique(plan)
    layout = plan.layout(spec)
    users = {rep.id: [lvl.name for lvl in plan.levels if rep.id in lvl.replacement_ids] for rep in plan.replacements}
    for rep in plan.replacements:
        for issue in rep.issues(layout):
            used = f" (used by level(s) {', '.join(users[rep.id])})" if users[rep.id] else " (used by no level)"
            raise ConfigError(
                f"Replacement {rep.id} {issue.what}{used}", expected=issue.expected, found=issue.found, fix=issue.fix
            )
    known = {rep.id: rep for rep in plan.replacements}
    for lvl in plan.levels:
        missing = [i for i in lvl.replacement_ids if i not in known]
        if missing:
            raise ConfigError(
                f"Level {lvl.name} references unknown replacement(s) {missing}",
                expected=f"ids from the plan's replacements {sorted(known)}",
                found=str(missing),
                fix="fix the id or add the replacement",
            )
        repeated = sorted(i for i, n in Counter(lvl.replacement_ids).items() if n > 1)
        if repeated:
            raise ConfigError(
                f"Level {lvl.name} lists replacement(s) {repeated} more than once",
                expected="each replacement once per level",
                found=str(list(lvl.replacement_ids)),
                fix="remove the duplicates",
            )
        active = [known[i] for i in lvl.replacement_ids]
        for a, first in enumerate(active):
            for second in active[a + 1 :]:
                if first.conflicts_with(second) or second.conflicts_with(first):
                    raise ConfigError(
                        f"Replacements {first.id} and {second.id} overlap in level {lvl.name}",
                        expected="replacements of one level that touch disjoint blocks",
                        found=f"{first.describe(layout)}; {second.describe(layout)}",
                        fix=f"drop one of them from level {lvl.name}, or merge them into one span",
                    )


def _check_header(plan: PruningPlan, spec: ArchSpec) -> None:
    from ppcl.arch import supported_classes

    if spec.name != plan.arch:
        raise ConfigError(
            f"The plan is for architecture {plan.arch!r}, not {spec.name!r}",
            expected=spec.name,
            found=plan.arch,
            fix="validate against the plan's own architecture",
        )
    if not plan.model_class or (plan.model_class in supported_classes() and plan.model_class != spec.model_class_name):
        raise ConfigError(
            f"The plan's model class does not belong to architecture {plan.arch!r}",
            expected=spec.model_class_name,
            found=repr(plan.model_class),
            fix="set `model_class` to the base transformer's class name",
        )
    sizes = plan.stack_sizes
    if len(sizes) != len(spec.stacks) or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ConfigError(
            f"The plan's stack sizes do not fit {spec.model_class_name}",
            expected=f"{len(spec.stacks)} positive block count(s), for {[s.attr for s in spec.stacks]}",
            found=str(list(sizes)),
            fix="set `stack_sizes` to the base model's blocks per stack",
        )
    for name in ("protect_first", "protect_last"):
        value = getattr(plan, name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= plan.num_blocks:
            raise ConfigError(
                f"The plan's `{name}` is out of range",
                expected=f"an integer in [0, {plan.num_blocks}]",
                found=repr(value),
            )


def _check_unique(plan: PruningPlan) -> None:
    ids = Counter(rep.id for rep in plan.replacements)
    dup_ids = sorted(i for i, n in ids.items() if n > 1)
    if dup_ids:
        raise ConfigError(
            f"Replacement id(s) {dup_ids} are used more than once",
            expected="unique replacement ids",
            found=str([rep.id for rep in plan.replacements]),
            fix="give each replacement its own id (or delete the duplicate)",
        )
    names = Counter(lvl.name for lvl in plan.levels)
    dup_names = sorted(n for n, k in names.items() if k > 1)
    if dup_names:
        raise ConfigError(
            f"Level name(s) {dup_names} are used more than once",
            expected="unique level names",
            found=str(plan.level_names),
            fix="rename the duplicate level(s)",
        )
    empty = [i for i, lvl in enumerate(plan.levels) if not lvl.name.strip()]
    if empty:
        raise ConfigError(
            "A level has no name",
            expected="a non-empty name per level",
            found=f"levels {empty}",
            fix="name every level",
        )
