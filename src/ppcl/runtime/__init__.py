"""Use an add-on: plug it into the base model in place (reversible) or merge a level into a new, smaller model.

Example::

    from ppcl.runtime import apply_addon, set_level, disabled, remove_addon, merge
    apply_addon(transformer, addon, level="p40")   # in place; base parameters untouched
    set_level(transformer, None)                    # the original model again (O(1))
    with disabled(transformer): ...                 # temporarily the original model (the distillation teacher)
    small = merge(transformer, addon, "p40")        # new stock diffusers model with fewer blocks
    remove_addon(transformer)                       # exactly the original module again
"""

from ppcl.runtime.apply import (
    ADDON_ATTR,
    SKIP,
    STATE_ATTR,
    RuntimeState,
    active_level,
    addon_keys_visible,
    apply_addon,
    disabled,
    remove_addon,
    runtime_state,
    set_level,
)
from ppcl.runtime.block_map import BLOCKS_FILE, BlockMap, StackMap
from ppcl.runtime.controlnet import ControlNetRemap, attach_block_map, map_residuals
from ppcl.runtime.lora import load_lora, lora_state_dict, remap_lora_state_dict
from ppcl.runtime.merge import merge
from ppcl.runtime.merge_width import MERGED_FILE, load_merged, save_merged
from ppcl.runtime.merged_component import COMPONENT_MODULE, register_component
from ppcl.runtime.width import width_modules

__all__ = [
    "ADDON_ATTR",
    "BLOCKS_FILE",
    "BlockMap",
    "COMPONENT_MODULE",
    "ControlNetRemap",
    "StackMap",
    "attach_block_map",
    "map_residuals",
    "MERGED_FILE",
    "SKIP",
    "STATE_ATTR",
    "RuntimeState",
    "active_level",
    "addon_keys_visible",
    "apply_addon",
    "disabled",
    "load_lora",
    "load_merged",
    "lora_state_dict",
    "merge",
    "remap_lora_state_dict",
    "register_component",
    "remove_addon",
    "runtime_state",
    "save_merged",
    "set_level",
    "width_modules",
]
