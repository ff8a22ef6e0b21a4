"""Chain-aware inputs for non-sequential depth distillation (METHOD.md "Beyond the paper: chain-aware students").

A student trained only on the teacher's input ``x_{u−1}`` meets, at inference, the output of the *upstream students*
of its level whenever spans follow each other (directly, or with a few kept teacher blocks between them): measured on
the toy teacher, the chained output error grows 0.003 → 0.042 for such a student. Here, from the SAME teacher pass,
every level's pruned stream is rebuilt span by span (no gradient): each upstream student runs on its own chained input
and the kept teacher blocks between two spans run on the result, using the calls the teacher pass recorded (same
temb, rotary embeddings and mask). The student is then trained on a mix of its teacher input and these chained
inputs, so it learns to correct the error it will receive, while still being called on its own: the add-on stays
pluggable and training stays one teacher pass per batch.

A chain restarts at a block-stack boundary (FLUX.1 double → single): the stack switch changes how streams are
passed, and the teacher's input is used there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ppcl.arch import ArchSpec
from ppcl.data.recorder import BlockCall
from ppcl.plan import DepthReplacement, PruningPlan

Streams = dict[str, Tensor]
"""``{"image": (B, N_img, D), "text": (B, N_txt, D)}``: the two token streams between blocks."""


def chain_groups(plan: PruningPlan, trained: Sequence[DepthReplacement]) -> list[list[DepthReplacement]]:
    """Per plan level, the trained depth spans it activates, ordered by position; levels with fewer than two such
    spans have no chain and are left out, and a chain shared by several levels is kept once.

    Limits: a level's width replacements are not applied (the kept blocks between spans run as the teacher's), and
    depth spans not being trained are treated as kept teacher blocks."""
    ids = {rep.id: rep for rep in trained}
    seen: set[tuple[str, ...]] = set()
    groups = []
    for level in plan.levels:
        reps = sorted((ids[r] for r in level.replacement_ids if r in ids), key=lambda r: r.span.start)
        key = tuple(r.id for r in reps)
        if len(reps) >= 2 and key not in seen:
            seen.add(key)
            groups.append(reps)
    return groups


def chain_blocks(model: nn.Module, spec: ArchSpec, groups: Sequence[Sequence[DepthReplacement]]) -> set[int]:
    """Flat indices of the kept teacher blocks that chains run between spans (their calls must be recorded)."""
    out: set[int] = set()
    for group in groups:
        for prev, rep in zip(group, group[1:], strict=False):
            if _same_stack(model, spec, prev.span.stop - 1, rep.span.start):
                out.update(range(prev.span.stop, rep.span.start))
    return out


def call_with_streams(
    spec: ArchSpec, model: nn.Module, i: int, call: BlockCall, streams: Mapping[str, Tensor]
) -> dict[str, Any]:
    """The keyword arguments of block ``i``'s recorded ``call`` with its stream inputs replaced by ``streams``."""
    bound = spec.bind_call(model, i, call.args, call.kwargs)
    for stream, name in spec.stack_of(model, i).stream_inputs:
        if stream in streams:
            bound[name] = streams[stream]
    return bound


@torch.no_grad()
def chained_inputs(
    model: nn.Module,
    spec: ArchSpec,
    groups: Sequence[Sequence[DepthReplacement]],
    records: Mapping[int, BlockCall],
    student_of: Callable[[DepthReplacement], nn.Module],
    teacher_block: Callable[[int], Callable[..., Any]],
) -> dict[str, list[Streams]]:
    """``{replacement id: [chained input streams, one per level whose chain reaches it]}``, all detached.

    Args:
        groups: :func:`chain_groups`.
        records: the teacher pass's calls of every span start and of every :func:`chain_blocks` block.
        student_of: the student of a replacement.
        teacher_block: the original (undispatched) forward of flat block ``i``.
    """
    out: dict[str, list[Streams]] = {}
    for group in groups:
        state: Streams | None = None  # the pruned stream after the previous span, None at a chain start
        position = 0  # the block after the previous span
        for rep in group:
            u = rep.span.start
            dtype = _stream_dtype(spec, model, u, records[u])
            if state is not None and _same_stack(model, spec, position - 1, u):
                for j in range(position, u):
                    state = _streams(
                        spec, model, j, teacher_block(j)(**call_with_streams(spec, model, j, records[j], state)), dtype
                    )
                    if state is None:  # a kept block that returns no text (SD3's last) ends the chain
                        break
                if state is not None:
                    out.setdefault(rep.id, []).append(state)
            else:
                state = None
            kwargs = call_with_streams(spec, model, u, records[u], state) if state else records[u].kwargs
            args = () if state else records[u].args
            state = _streams(spec, model, u, student_of(rep)(*args, **kwargs), dtype)
            position = rep.span.stop
    return out


def mix_inputs(teacher: Streams, chained: Sequence[Streams], ratio: float, offset: int = 0) -> Streams:
    """The teacher input with the first ``round(ratio * B)`` rows (at least one when ``ratio > 0``) taken from the
    chained inputs, row ``r`` from ``chained[r % len(chained)]``, so every level's chain is represented and no extra
    student forward is needed. When there are fewer such rows than chains (batches of 1-2 per device), the choice
    rotates with ``offset`` (the batch index), so every chain is still trained over the steps.

    Shapes: every stream ``(B, N, D)``; rows are whole samples.
    """
    batch = next(iter(teacher.values())).shape[0]
    rows = max(1, int(round(ratio * batch))) if ratio > 0 else 0
    if rows == 0 or not chained:
        return dict(teacher)
    shift = offset if rows < len(chained) else 0
    out = {}
    for stream, x in teacher.items():
        mixed = x.clone()
        for r in range(rows):
            mixed[r] = chained[(r + shift) % len(chained)][stream][r].to(x.dtype)
        out[stream] = mixed
    return out


def _streams(spec: ArchSpec, model: nn.Module, i: int, output: Any, dtype: torch.dtype) -> Streams | None:
    """The streams block ``i`` returned, in the stream dtype the model passes between blocks (an fp32 master student
    under autocast may return float32), or None when one its stack returns is missing (SD3's last block returns no
    text). Streams a stack never returns (Wan's read-only text context) are left out: the next block reads them from
    its own recorded call."""
    split = spec.split_outputs(model, i, output)
    returned = spec.output_order(model, i)
    if any(split[s] is None for s in returned):
        return None
    return {s: split[s].to(dtype) for s in returned}


def _stream_dtype(spec: ArchSpec, model: nn.Module, i: int, call: BlockCall) -> torch.dtype:
    return spec.split_inputs(model, i, call.args, call.kwargs)["image"].dtype


def _same_stack(model: nn.Module, spec: ArchSpec, i: int, j: int) -> bool:
    total = spec.num_blocks(model)
    return 0 <= i < total and 0 <= j < total and spec.locate(model, i)[0] == spec.locate(model, j)[0]
