"""One streaming pass of the teacher over a calibration set, feeding every statistic the analysis needs.

Hooks on every block see its inputs and outputs (both streams) and immediately update, per block and stream:
the residual-probe Gram statistics (all valid tokens, float64, memory O(D²) per block whatever the token count),
Block Influence, and the FFN linear-fit statistics (second-half input g → block output). A seeded subset of token
positions, the same at every depth of one forward pass, is cached so that CKA trajectories can later be computed
token-wise from cached activations alone, without re-running attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ppcl.analysis.baselines import BlockInfluenceAccumulator
from ppcl.analysis.probes import ProbeAccumulator
from ppcl.arch import get_spec
from ppcl.data.calibration import CalibrationSet
from ppcl.logging import progress
from ppcl.storage import compute_dtype

STREAMS = ("image", "text")


@dataclass
class StreamStats:
    """Accumulated statistics of one stream over all blocks (``L`` blocks)."""

    probes: list[ProbeAccumulator | None]
    influence: list[BlockInfluenceAccumulator | None]
    ffn: list[ProbeAccumulator | None]
    # cache[0] holds x_{-1} (block 0's input); cache[i + 1] holds x_i (block i's output). Each a list of (n, D) chunks.
    cache: list[list[torch.Tensor]]

    def cached(self, depth: int) -> torch.Tensor | None:
        """Cached tokens ``(N_cache, D)`` at depth ``depth`` (0 = embedded input), or None if never seen."""
        chunks = self.cache[depth]
        return torch.cat(chunks) if chunks else None


@dataclass
class Collected:
    """Everything one pass gathered: per-stream statistics plus token counts."""

    num_blocks: int
    dim: int
    streams: dict[str, StreamStats]
    tokens_seen: dict[str, int] = field(default_factory=dict)


class _Pass:
    """Per-forward state: which token rows to cache, shared by every block of one forward pass."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: dict[str, torch.Tensor | None] = {}
        self.masks: dict[str, torch.Tensor | None] = {}
        self.text_length: int | None = None  # of the model call, to split FLUX.2's joint [text; image] sequence

    def reset(self, text_length: int | None = None) -> None:
        self.rows, self.masks, self.text_length = {}, {}, text_length


class StatsCollector:
    """Hooks a transformer's blocks and accumulates analysis statistics while calibration batches run through it.

    Args:
        model: a supported diffusers transformer (the teacher), in eval mode.
        cache_tokens: how many token positions per stream to cache at every depth, in total over the pass.
        n_forwards: how many forward passes will run (to spread ``cache_tokens`` evenly over them).
        seed: seeds the cached-token selection.
        cache_dtype: dtype of the token cache (float32 for exact CKA; bfloat16 halves memory on big models).
    """

    def __init__(
        self,
        model: nn.Module,
        cache_tokens: int,
        n_forwards: int,
        seed: int = 0,
        cache_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model, self.spec = model, get_spec(model)
        self.num_blocks = self.spec.num_blocks(model)
        self.per_forward = max(1, math.ceil(cache_tokens / max(1, n_forwards)))
        self.cache_dtype = cache_dtype
        self.state = _Pass(seed)
        self.streams = {
            s: StreamStats(
                [None] * self.num_blocks,
                [None] * self.num_blocks,
                [None] * self.num_blocks,
                [[] for _ in range(self.num_blocks + 1)],
            )
            for s in STREAMS
        }
        self.ffn_inputs: dict[tuple[int, str], torch.Tensor] = {}
        self.tokens_seen = {s: 0 for s in STREAMS}
        self._handles: list[Any] = []

    # ----------------------------------------------------------------------------------------------- hooks
    def __enter__(self) -> StatsCollector:
        self._handles.append(self.model.register_forward_pre_hook(self._model_hook, with_kwargs=True))
        for i, block in enumerate(self.spec.blocks(self.model)):
            self._handles.append(block.register_forward_hook(self._block_hook(i), with_kwargs=True))
            for stream, name in self.spec.width_targets(self.model, i).ffn_input:
                module = block.get_submodule(name)
                self._handles.append(module.register_forward_pre_hook(self._ffn_hook(i, stream)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _model_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.state.reset(self.spec.text_length(module, args, kwargs))

    def _ffn_hook(self, i: int, stream: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.ffn_inputs[(i, stream)] = args[0].detach()

        return hook

    def _block_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            length = self.state.text_length
            inputs = self.spec.unjoin(self.model, i, self.spec.split_inputs(self.model, i, args, kwargs), length)
            outputs = self.spec.unjoin(self.model, i, self.spec.split_outputs(self.model, i, output), length)
            text_mask = self._text_mask(i, args, kwargs)
            for stream in STREAMS:
                x, y = inputs[stream], outputs[stream]
                if y is None:  # SD3's last block has no text output
                    continue
                mask = text_mask if stream == "text" else None
                self._update(i, stream, x.detach(), y.detach(), mask)

        return hook

    def _text_mask(self, i: int, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        name = self.spec.stack_of(self.model, i).input_name("text_mask")
        if name is None:
            return None
        mask = self.spec.bind_call(self.model, i, args, kwargs).get(name)
        return None if mask is None else mask.bool()

    # ------------------------------------------------------------------------------------------ accumulation
    def _update(self, i: int, stream: str, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        """x, y: ``(B, N, D)`` input and output of block ``i``; mask ``(B, N)`` of valid tokens or None."""
        stats = self.streams[stream]
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        flat_mask = None if mask is None else mask.reshape(-1)
        if stats.probes[i] is None:
            stats.probes[i] = ProbeAccumulator(x.shape[-1])
            stats.influence[i] = BlockInfluenceAccumulator()
        stats.probes[i].update(flat_x, flat_y, flat_mask)
        stats.influence[i].update(flat_x, flat_y, flat_mask)
        g = self.ffn_inputs.pop((i, stream), None)
        if g is not None:
            if stats.ffn[i] is None:
                stats.ffn[i] = ProbeAccumulator(g.shape[-1])
            stats.ffn[i].update(g.reshape(-1, g.shape[-1]), flat_y, flat_mask)
        rows = self._rows(stream, flat_x.shape[0], flat_mask)
        if i == 0:
            stats.cache[0].append(flat_x[rows].to("cpu", self.cache_dtype))
            self.tokens_seen[stream] += int(flat_mask.sum()) if flat_mask is not None else flat_x.shape[0]
        stats.cache[i + 1].append(flat_y[rows].to("cpu", self.cache_dtype))

    def _rows(self, stream: str, n: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Token rows to cache in this forward pass, chosen once and reused at every depth."""
        rows = self.state.rows.get(stream)
        if rows is None:
            valid = torch.arange(n) if mask is None else torch.nonzero(mask.cpu()).flatten()
            order = torch.randperm(valid.numel(), generator=self.state.generator)[: self.per_forward]
            rows = valid[order.sort().values]
            self.state.rows[stream] = rows
        return rows.to(self.model.device if hasattr(self.model, "device") else "cpu")

    def result(self) -> Collected:
        dim = next(p for p in self.streams["image"].probes if p is not None).dim
        return Collected(self.num_blocks, dim, self.streams, dict(self.tokens_seen))


@torch.no_grad()
def collect(
    model: nn.Module,
    calibration: CalibrationSet,
    batch_size: int = 32,
    cache_tokens: int = 8192,
    seed: int = 0,
    cache_dtype: torch.dtype = torch.float32,
) -> Collected:
    """Run ``model`` over every calibration batch once and return the accumulated statistics."""
    device = next(model.parameters()).device
    dtype = compute_dtype(model)  # not the storage dtype of an fp8 layerwise-cast or quantised model
    n_forwards = math.ceil(len(calibration) / batch_size)
    with StatsCollector(model, cache_tokens, n_forwards, seed, cache_dtype) as collector:
        for batch in progress(calibration.batches(batch_size, device, dtype), desc="analysis pass", total=n_forwards):
            model(**batch, return_dict=False)
    return collector.result()
