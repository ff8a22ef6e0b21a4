"""One home per replacement kind: what the add-on and the runtime do with each kind of a plan's replacements.

``depth`` (:mod:`ppcl.kinds.depth`), ``text_run`` (:mod:`ppcl.kinds.text_run`), ``ffn_linear``
(:mod:`ppcl.kinds.ffn_linear`) and ``drop`` (:mod:`ppcl.kinds.drop`) each register a :class:`~ppcl.kinds.base.Kind`;
callers ask :func:`kind_of` instead of switching on replacement classes. A new kind is one module here holding its plan
value object (a :class:`~ppcl.plan.replacements.Replacement` registered with :func:`~ppcl.plan.register_replacement`)
and its behaviour, as ``drop`` does, plus its import below. The three kinds the planner proposes from an analysis
report keep their value objects in :mod:`ppcl.plan` because ``plan/`` builds them, and plan sits below kinds.

Layering: kinds sit above plan, modules and arch, below addon and runtime (they import neither).
"""

from ppcl.kinds import depth, drop, ffn_linear, text_run  # noqa: F401  (registration)
from ppcl.kinds.base import Kind, check_kinds, kind_of, register_kind, registered_kinds, student_key
from ppcl.kinds.drop import DropSpan
from ppcl.kinds.projections import block_dim, width_key

__all__ = [
    "DropSpan",
    "Kind",
    "block_dim",
    "depth",
    "drop",
    "ffn_linear",
    "text_run",
    "check_kinds",
    "kind_of",
    "register_kind",
    "registered_kinds",
    "student_key",
    "width_key",
]
