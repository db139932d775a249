"""Data parallelism for one trained module: DDP (a full replica per rank) or FSDP2 (sharded).

`parallelize` applies `trainer.strategy`. Under FSDP every Transformer block is its own shard group
(its weights are gathered just before it runs and freed after) and the root holds the rest
(embeddings, norms, the output head), so a rank keeps 1/world of the weights, gradients and
optimizer state. Full weights are gathered only on request (`full_tensors`): evaluation, export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from parti.distributed import Dist, backend_for

STRATEGIES = ("ddp", "fsdp")


class Parallel:
    """The module as the loss calls it, and how to skip the gradient reduce of a micro-batch."""

    def __init__(self, module: nn.Module, wrapped: nn.Module, sharded: bool):
        self.module = module      # the plain (or sharded in place) model: state dicts, EMA
        self.wrapped = wrapped    # what forward/backward run through (DDP wrapper or the module)
        self.sharded = sharded

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """A context in which backward reduces gradients over ranks only when `enabled`.

        Accumulation calls it with False for every micro-batch but the last: gradients build up
        locally and are reduced once per optimizer step.
        """
        if self.sharded:
            self.module.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if isinstance(self.wrapped, DDP) and not enabled:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()


def blocks(module: nn.Module, block_types: tuple[type, ...]) -> list[nn.Module]:
    """The submodules that are units of sharding and activation checkpointing."""
    return [m for m in module.modules() if isinstance(m, block_types)]


def mixed_precision(precision: str, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 weights in compute with fp32 gradient reduction on GPU; full fp32 otherwise."""
    if precision == "bf16" and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _process_group(d: Dist) -> None:
    """FSDP needs a process group even for one process (e.g. `python train_parti.py` on 1 GPU)."""
    if not dist.is_initialized():
        dist.init_process_group(backend_for(d.device), store=dist.HashStore(), rank=0,
                                world_size=1)


def parallelize(module: nn.Module, strategy: str, d: Dist, precision: str,
                activation_checkpointing: bool, compile_: bool,
                block_types: tuple[type, ...]) -> Parallel:
    """Wrap `module` (already on its device) for `strategy`; see the module docstring.

    Order as PyTorch recommends: activation checkpointing, then torch.compile of each block (in
    place: parameter names stay clean; a module without blocks is compiled whole), then sharding.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"trainer.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    units = blocks(module, block_types)
    if activation_checkpointing:
        for block in units:
            checkpoint(block)  # recompute the block's activations in backward instead of keeping them
    if compile_:
        for unit in units or [module]:
            unit.compile()
    if strategy == "fsdp":
        _process_group(d)
        mesh = init_device_mesh(d.device.type, (d.world_size,))
        policy = mixed_precision(precision, d.device)
        for block in units:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        return Parallel(module, module, sharded=True)
    if d.enabled:
        # Buffers (e.g. codebook usage counts) are per rank; models that need them equal sync them.
        return Parallel(module, DDP(module, broadcast_buffers=False), sharded=False)
    return Parallel(module, module, sharded=False)


def full_tensor(value: Tensor) -> Tensor:
    """The whole tensor of a shard (collective: every rank calls it in the same order)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_tensors(state: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """(name, whole tensor) for each entry of a possibly sharded state dict, one at a time, so
    at most one gathered tensor beyond the caller's copies is alive (collective)."""
    for name in sorted(state):
        yield name, full_tensor(state[name])


def gather_to_cpu(state: dict[str, Tensor], keep: bool) -> dict[str, Tensor]:
    """The whole tensors of `state` on the CPU, kept only where `keep` (e.g. rank 0); one tensor
    at a time is gathered, so no rank holds a second whole copy on its device (collective)."""
    return {name: tensor.detach().cpu().clone() for name, tensor in full_tensors(state) if keep}
