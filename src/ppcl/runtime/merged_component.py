"""Width-merged transformers as a diffusers custom component: ``DiffusionPipeline.from_pretrained`` loads them.

A width merge is not a stock diffusers model (its blocks run linear maps in place of dropped modules), so a pipeline
saved with one cannot name a diffusers class for its transformer. It names this module instead: a width-merged model
is registered under ``["ppcl.runtime.merged_component", "<its diffusers class>"]`` (its instance ``__module__``,
which diffusers reads when a pipeline registers a component), so a pipeline's ``save_pretrained`` writes that into
``model_index.json``, and loading the folder resolves the class name here, to a loader whose ``from_pretrained`` is
:func:`ppcl.runtime.load_merged`::

    import ppcl  # diffusers loads components of modules the caller has imported, and only those
    pipe = DiffusionPipeline.from_pretrained("merged-pipeline/")  # its transformer: the width-merged model

Depth-only merges are stock diffusers models and keep naming ``diffusers``. Given a Hub id, diffusers checks the
repo's file list for a component's module file and refuses this one (it ships with ppcl, not with the repo): load
such a repo with :func:`ppcl.load_pipeline`, or pass diffusers the path of its snapshot.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

from ppcl.arch import supported_classes
from ppcl.errors import ConfigError

COMPONENT_MODULE = __name__
"""The library name width-merged transformers are saved under in a pipeline's ``model_index.json``."""


def register_component(model: nn.Module) -> nn.Module:
    """Make ``model`` (a width-merged transformer) register in pipelines as this module's component. Returns it.

    diffusers records a component as ``(model.__module__, type(model).__name__)``; the instance attribute shadows the
    class's, so the model keeps its diffusers class (and everything that checks it) while pipelines save it as ours.
    """
    model.__dict__["__module__"] = COMPONENT_MODULE
    return model


def __getattr__(name: str) -> type:
    """The loader class for the diffusers transformer class ``name`` (only those ppcl supports), and ``ModelMixin``.

    Lazily, so that ``import ppcl`` does not import diffusers: diffusers asks for these names only once it is loaded.
    """
    if name == "ModelMixin":  # diffusers picks a component's load method by the base classes the module names
        from diffusers import ModelMixin

        return ModelMixin
    if name in supported_classes():
        return _loader(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _loader(class_name: str) -> type:
    from diffusers import ModelMixin

    # A ModelMixin subclass, because diffusers picks a component's load method by its base class; it is never
    # instantiated: from_pretrained returns the merged model, of the real diffusers class.
    return type(
        class_name,
        (ModelMixin,),
        {
            "__module__": __name__,
            "__doc__": f"Loads a width-merged {class_name} saved by ppcl (see {__name__}).",
            "from_pretrained": classmethod(_from_pretrained),
        },
    )


_REFUSED = {
    "device_map": "load it, then move the pipeline with pipe.to(device) or enable_model_cpu_offload()",
    "quantization_config": "load it unquantised: merged students stay in full precision",
    "variant": "load the folder without variant= (a merged model is saved in one variant)",
    "use_flashpack": "load it without use_flashpack",
}
"""diffusers loading options a width-merged model does not support, with what to do instead."""


def _from_pretrained(cls: type, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> nn.Module:
    """:func:`ppcl.runtime.load_merged` of the component folder, with diffusers' ``torch_dtype`` (or ``dtype``).

    Options that only steer how diffusers itself reads weights (``low_cpu_mem_usage``, ``use_safetensors``,
    ``disable_mmap``, offloading folders) do not apply to a replayed width merge and are ignored; options that would
    change the result (``device_map``, ``quantization_config``, ``variant``) are refused.
    """
    from ppcl.runtime.merge_width import load_merged

    for key, fix in _REFUSED.items():
        if kwargs.get(key) not in (None, False):
            raise ConfigError(
                f"a width-merged transformer cannot be loaded with {key}",
                expected=f"{key}=None",
                found=f"{key}={kwargs[key]!r} for {pretrained_model_name_or_path}",
                fix=fix,
            )
    dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ConfigError(
            "a width-merged transformer loads in one torch dtype",
            expected="torch_dtype=None or a torch.dtype",
            found=f"torch_dtype={dtype!r}",
            fix="pass e.g. torch_dtype=torch.bfloat16",
        )
    model = load_merged(pretrained_model_name_or_path, dtype=dtype)
    if type(model).__name__ != cls.__name__:
        raise ConfigError(
            "the merged folder holds another model class than model_index.json names",
            expected=cls.__name__,
            found=f"{type(model).__name__} in {pretrained_model_name_or_path}",
            fix="re-save the pipeline with save_pretrained, or fix the transformer entry of model_index.json",
        )
    return model
