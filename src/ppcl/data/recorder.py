"""Record the exact calls of chosen transformer blocks during ordinary model forwards.

:class:`ActivationRecorder` hooks flat block indices (see :mod:`ppcl.arch.spec`) and stores, for every call, the
positional and keyword arguments (streams, ``temb``, rotary embeddings, masks, attention kwargs, ``modulate_index``)
and the returned value, detached. :func:`recall` re-runs a block on such a record and reproduces its output bit for
bit when the record was kept on its original device and dtype.

Memory: only chosen blocks are recorded. Without ``clone``/``device``/``dtype`` the records are detached *views* of
tensors the forward pass made anyway. With a conversion, each distinct tensor is converted once per forward pass, so
the conditioning shared by all blocks (``temb``, rotary embeddings, masks) and block ``i``'s output, which is block
``i + 1``'s input, are stored once, not once per use.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ppcl.arch import ArchSpec, get_spec
from ppcl.logging import get_logger

_log = get_logger(__name__)


@dataclass
class BlockCall:
    """One recorded call of a block.

    Attributes:
        args: positional arguments as the model passed them (the gradient-checkpointing path passes everything
            positionally).
        kwargs: keyword arguments as the model passed them (the normal path passes keywords).
        output: what the block returned, e.g. ``(encoder_hidden_states (B, N_txt, D) | None, hidden_states
            (B, N_img, D))``; ``None`` when outputs are not recorded.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None


class ActivationRecorder:
    """Context manager recording every call of the chosen blocks.

    Args:
        model: a supported diffusers transformer.
        blocks: flat block indices to record (negative indices count from the end).
        spec: its ArchSpec; looked up with :func:`~ppcl.arch.get_spec` when omitted.
        device: move recorded tensors here (e.g. ``"cpu"`` to free accelerator memory).
        dtype: cast recorded *floating-point* tensors to this dtype; integer/bool masks and complex rotary
            embeddings are left alone.
        clone: copy tensors even when no move or cast is needed, so later in-place edits cannot change records.
        record_outputs: also store what each block returned.

    ``recorder[i]`` is the list of :class:`BlockCall` of block ``i``, one per call (so one per forward pass when the
    model calls each block once). Hooks are installed on ``__enter__``/:meth:`start` and removed on
    ``__exit__``/:meth:`stop`; records survive until :meth:`clear`.

    Hooks run on every call, including the recomputation of checkpointed blocks during ``backward``; record under
    ``torch.no_grad()`` (as a teacher pass does) or call :meth:`paused` around such work.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Iterable[int],
        *,
        spec: ArchSpec | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        clone: bool = False,
        record_outputs: bool = True,
    ) -> None:
        self.model = model
        self.spec = spec if spec is not None else get_spec(model)
        total = self.spec.num_blocks(model)
        indices = []
        for i in blocks:
            self.spec.locate(model, i)  # raises a clear error for out-of-range indices
            indices.append(int(i) % total)
        self.indices: tuple[int, ...] = tuple(sorted(set(indices)))
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.clone = clone
        self.record_outputs = record_outputs
        self.records: dict[int, list[BlockCall]] = {i: [] for i in self.indices}
        self._handles: list[RemovableHandle] = []
        self._pending: dict[int, BlockCall] = {}
        # id(original tensor) -> (original, stored copy); the original is held so its id cannot be reused mid-pass.
        self._memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._paused = False

    # -------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> ActivationRecorder:
        """Install the hooks (idempotent)."""
        if self._handles:
            return self
        blocks = self.spec.blocks(self.model)
        for i in self.indices:
            block = blocks[i]
            self._handles.append(block.register_forward_pre_hook(self._make_pre_hook(i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._make_post_hook(i), with_kwargs=True))
        # Pass boundaries reset the conversion memo, so it never outlives one forward.
        self._handles.append(self.model.register_forward_pre_hook(lambda *_: self._memo.clear()))
        self._handles.append(self.model.register_forward_hook(lambda *_: self._memo.clear()))
        _log.debug("recording blocks %s of %s", self.indices, type(self.model).__name__)
        return self

    def stop(self) -> None:
        """Remove the hooks; records are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        self._memo.clear()

    def __enter__(self) -> ActivationRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def clear(self) -> None:
        """Drop all records (hooks stay installed)."""
        for calls in self.records.values():
            calls.clear()
        self._pending.clear()
        self._memo.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Temporarily record nothing (e.g. while re-calling recorded blocks inside the recording context)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    # ----------------------------------------------------------------------------------------------- access
    def __getitem__(self, i: int) -> list[BlockCall]:
        return self.records[int(i) % self.spec.num_blocks(self.model)]

    def __len__(self) -> int:
        """Number of recorded calls over all blocks."""
        return sum(len(calls) for calls in self.records.values())

    # ------------------------------------------------------------------------------------------------ hooks
    def _make_pre_hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._paused:
                return
            # Inputs are stored before the block runs, so a block that edited its inputs in place could not alter
            # what the record says it received (when cloning).
            self._pending[i] = BlockCall(args=self._store(args), kwargs=self._store(kwargs))

        return hook

    def _make_post_hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            call = self._pending.pop(i, None)
            if call is None:  # paused at the pre-hook
                return
            if self.record_outputs:
                call.output = self._store(output)
            self.records[i].append(call)

        return hook

    def _store(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self._store_tensor(value)
        if isinstance(value, tuple):
            return tuple(self._store(v) for v in value)
        if isinstance(value, list):
            return [self._store(v) for v in value]
        if isinstance(value, dict):
            # A new dict: the model may mutate its own (e.g. joint_attention_kwargs) after the call.
            return {k: self._store(v) for k, v in value.items()}
        return value

    def _store_tensor(self, t: torch.Tensor) -> torch.Tensor:
        hit = self._memo.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        stored = t.detach()
        if self.device is not None or (self.dtype is not None and stored.is_floating_point()):
            dtype = self.dtype if (self.dtype is not None and stored.is_floating_point()) else None
            moved = stored.to(device=self.device, dtype=dtype)
            stored = moved.clone() if (self.clone and moved.data_ptr() == stored.data_ptr()) else moved
        elif self.clone:
            stored = stored.clone()
        self._memo[id(t)] = (t, stored)
        return stored


def recall(block: nn.Module, record: BlockCall) -> Any:
    """Call ``block`` exactly as recorded; equals ``record.output`` bit for bit on the original device and dtype.

    Runs under the caller's grad mode. If an :class:`ActivationRecorder` is recording this block, wrap the call in
    :meth:`ActivationRecorder.paused` to keep it out of the records.
    """
    return block(*record.args, **record.kwargs)
