"""The PruningAddon artefact: student blocks + width projections + manifest (base fingerprint, plan, levels,
provenance, metrics).

Example::

    from ppcl.addon import PruningAddon
    addon = PruningAddon.from_plan(transformer, plan)
    addon.save_pretrained("runs/addon")        # ppcl_addon.json + ppcl_addon.safetensors + README.md
    addon = PruningAddon.from_pretrained("runs/addon", transformer)
"""

from ppcl.addon.addon import PruningAddon, check_plan_fits, student_key
from ppcl.addon.blocks import base_named_shapes, has_adapter_layers, plain_block_copy
from ppcl.addon.fingerprint import check_fingerprint, fingerprint_of
from ppcl.addon.manifest import (
    ADDON_FILE,
    CARD_FILE,
    DEPTH_ONLY_FORMAT_VERSION,
    FORMAT_VERSION,
    WEIGHTS_FILE,
)

__all__ = [
    "ADDON_FILE",
    "CARD_FILE",
    "DEPTH_ONLY_FORMAT_VERSION",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "PruningAddon",
    "base_named_shapes",
    "check_fingerprint",
    "check_plan_fits",
    "fingerprint_of",
    "has_adapter_layers",
    "plain_block_copy",
    "student_key",
]
