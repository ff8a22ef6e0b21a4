"""ppcl: Pluggable Pruning with Contiguous Layer Distillation for multi-modal diffusion transformers."""

from ppcl.errors import PPCLError

__version__ = "0.1.0"

__all__ = ["PPCLError", "__version__"]
