"""One home per replacement kind: what the add-on and the runtime do with each kind of a plan's replacements.

``depth`` (:mod:`ppcl.kinds.depth`), ``text_run`` (:mod:`ppcl.kinds.text_run`) and ``ffn_linear``
(:mod:`ppcl.kinds.ffn_linear`) each register a :class:`~ppcl.kinds.base.Kind`; callers ask :func:`kind_of` instead of
switching on replacement classes. A new kind is its plan value object (a registered
:class:`~ppcl.plan.replacements.Replacement`) plus one module here.

Layering: kinds sit above plan, modules and arch, below addon and runtime (they import neither).
"""

from ppcl.kinds import depth, ffn_linear, text_run  # noqa: F401  (registration)
from ppcl.kinds.base import Kind, check_kinds, kind_of, register_kind, registered_kinds, student_key
from ppcl.kinds.projections import block_dim, width_key

__all__ = [
    "Kind",
    "block_dim",
    "depth",
    "ffn_linear",
    "text_run",
    "check_kinds",
    "kind_of",
    "register_kind",
    "registered_kinds",
    "student_key",
    "width_key",
]
