"""FSDP2 sharding of a distillation session (``DistillConfig(shard=True)``, ``ppcl distill --shard``, or an accelerate
config with ``distributed_type: FSDP``): every rank holds ``1/P`` of the frozen teacher's blocks and of the trained
students, their gradients and their AdamW moments instead of a full replica (docs/scale.md has the arithmetic).

How: for the length of the session each teacher block and each trained student is stood in for by a *twin*, a copy of
its module structure whose parameters are new ``Parameter`` objects over the same storage (nothing is copied), which
``torch.distributed.fsdp.fully_shard`` then shards. FSDP never touches the user's own modules: at the end the
teacher's original blocks go back into their lists unchanged (they are frozen), and the trained values are gathered
into the add-on's own students by :meth:`SessionShards.pull`, which the trainer also calls before every checkpoint.
Checkpoints therefore hold full tensors in exactly the layout of an unsharded run, and a run may resume under another
process count, or with sharding switched on or off.

Each block and each student is its own FSDP unit, resharded after its forward: its parameters are all-gathered just
before it runs and freed right after, so a rank's peak is its shards plus one gathered block. The small rest of the
model (embedders, final norm and projection) is replicated. Without a process group (one process, no launcher) a
one-rank group is made for the session, so the same code path runs, and is tested, in a single CPU process.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ppcl.arch import get_spec
from ppcl.logging import get_logger

log = get_logger("distill")


def twin(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters are new ``Parameter`` objects over the same storage.

    Sharding the copy replaces the copy's parameters and leaves ``module`` exactly as it was; buffers (small: rotary
    tables, norms' running values) are copied.
    """
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in module.parameters()}
    return copy.deepcopy(module, memo)


def _full(value: Tensor) -> Tensor:
    """The whole tensor behind a shard (a collective: every rank must call it, in the same order)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def _shard_like(full: Tensor, like: DTensor) -> DTensor:
    """``full`` cut as ``like`` is; every rank holds ``full`` (read from the same checkpoint), so no data moves."""
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


class SessionShards:
    """The FSDP2 twins of one training session; :meth:`close` puts the model back as it was.

    Args:
        model: the base transformer (bare, no add-on applied), frozen, on any device.
        device: this rank's device (``accelerator.device``); shards and the replicated rest of the model go there.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.own_group = not dist.is_initialized()
        if self.own_group:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        self.mesh: DeviceMesh = init_device_mesh(device.type, (dist.get_world_size(),))
        # FSDP2 warns when a unit returns a view (FLUX.1's single blocks split their output), since an in-place op on
        # it would skip the unit's backward hook. Here teacher outputs are only read under no_grad and student
        # outputs only by the loss, never modified in place.
        warnings.filterwarnings(
            "ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning
        )
        self.model, self.device = model, device
        self.home = next(model.parameters()).device
        self.blocks: list[tuple[nn.ModuleList, int, nn.Module]] = []
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        """(the add-on's parameter, its sharded twin) for every trained parameter."""

    @property
    def world(self) -> int:
        """Number of processes the shards are spread over."""
        return self.mesh.size()

    def _shard(self, module: nn.Module) -> nn.Module:
        stand_in = twin(module)
        # Explicit: a module that is its own FSDP root would otherwise keep its gathered parameters after forward.
        fully_shard(stand_in, mesh=self.mesh, reshard_after_forward=True)
        return stand_in

    def shard_teacher(self) -> None:
        """Put a sharded twin in place of every block of every stack and move the rest of the model to the device."""
        stacks = get_spec(self.model).stack_lists(self.model)
        self._move_rest(stacks, self.device)
        for stack in stacks:
            for j, block in enumerate(stack):
                self.blocks.append((stack, j, block))
                stack[j] = self._shard(block)
        log.info("sharded the teacher's %d blocks over %d process(es)", len(self.blocks), self.world)

    def shard_trained(self, students: nn.ModuleDict, keys: list[str]) -> nn.ModuleDict:
        """Sharded twins of ``students[key]`` for each key (the modules a step trains), paired for :meth:`pull`."""
        twins = nn.ModuleDict()
        for key in keys:
            original = students[key]
            twins[key] = self._shard(original)
            mine = dict(original.named_parameters())
            for name, param in twins[key].named_parameters():
                self.pairs.append((mine[name], param))  # type: ignore[arg-type]
        return twins

    def twins_of(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """The sharded stand-ins of the add-on's ``params``, in the same order."""
        shard_of = {id(original): shard for original, shard in self.pairs}
        return [shard_of[id(p)] for p in params]

    @torch.no_grad()
    def pull(self) -> None:
        """Gather the trained values into the add-on's own parameters (collective: every rank calls it)."""
        for original, shard in self.pairs:
            original.copy_(_full(shard).to(original.device, original.dtype))

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with every sharded moment gathered (collective), as an unsharded run saves it."""
        state = optimizer.state_dict()
        state["state"] = {
            index: {k: _full(v).cpu() if isinstance(v, Tensor) else v for k, v in entry.items()}
            for index, entry in state["state"].items()
        }
        return state

    def sharded_optimizer_state(self, state: dict[str, Any], params: list[nn.Parameter]) -> dict[str, Any]:
        """A saved (full) optimiser state cut to this rank's shards of ``params`` (the optimiser's own order)."""
        out = {**state, "state": {}}
        for index, entry in state["state"].items():
            param = params[int(index)]
            out["state"][index] = {
                k: _shard_like(v, param)
                if isinstance(param, DTensor) and isinstance(v, Tensor) and v.shape == param.shape
                else v
                for k, v in entry.items()
            }
        return out

    def close(self) -> None:
        """Put the original blocks back and the rest of the model where it was; end a group made for the session."""
        for stack, j, block in reversed(self.blocks):
            stack[j] = block
        stacks = [stack for stack, _, _ in self.blocks]
        if self.blocks:
            self._move_rest(list({id(s): s for s in stacks}.values()), self.home)
        self.blocks, self.pairs = [], []
        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()
            self.own_group = False

    def _move_rest(self, stacks: list[nn.ModuleList], device: torch.device) -> None:
        """Move everything of the model but its block lists (in place, keeping the Parameter objects)."""
        skip = {id(stack) for stack in stacks}
        for child in self.model.children():
            if id(child) not in skip:
                child.to(device)
        for param in self.model.parameters(recurse=False):
            param.data = param.data.to(device)
        for name, buffer in list(self.model.named_buffers(recurse=False)):
            setattr(self.model, name, buffer.to(device))
