"""Architecture knowledge as data: one :class:`ArchSpec` per supported diffusers transformer class.

Example (FLUX.1-dev)::

    spec = get_spec(transformer)             # raises UnsupportedModelError for unknown classes
    spec.num_blocks(transformer)             # 57
    spec.locate(transformer, 20)             # ("single_transformer_blocks", 1)
"""

from ppcl.arch.flux import FLUX_SPEC
from ppcl.arch.flux2 import FLUX2_SPEC
from ppcl.arch.hunyuanvideo15 import HUNYUAN15_SPEC
from ppcl.arch.qwenimage import QWENIMAGE_SPEC
from ppcl.arch.registry import (
    get_spec,
    register_spec,
    spec_by_name,
    supported_classes,
    width_block_classes,
    width_forward_of,
)
from ppcl.arch.sd3 import SD3_SPEC
from ppcl.arch.spec import STREAMS, ArchSpec, ControlNetInput, ModelInputs, StackSpec, WidthTargets
from ppcl.arch.wan import WAN_SPEC

for _spec in (QWENIMAGE_SPEC, FLUX_SPEC, FLUX2_SPEC, SD3_SPEC, WAN_SPEC, HUNYUAN15_SPEC):
    register_spec(_spec, replace=True)
del _spec

__all__ = [
    "FLUX2_SPEC",
    "FLUX_SPEC",
    "HUNYUAN15_SPEC",
    "QWENIMAGE_SPEC",
    "SD3_SPEC",
    "WAN_SPEC",
    "STREAMS",
    "ArchSpec",
    "ControlNetInput",
    "ModelInputs",
    "StackSpec",
    "WidthTargets",
    "get_spec",
    "register_spec",
    "spec_by_name",
    "supported_classes",
    "width_block_classes",
    "width_forward_of",
]
