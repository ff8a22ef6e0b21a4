"""Data at block boundaries: the activation recorder (and, later, calibration capture and cache readers)."""

from ppcl.data.recorder import ActivationRecorder, BlockCall, recall

__all__ = ["ActivationRecorder", "BlockCall", "recall"]
