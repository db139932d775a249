"""Process-group setup from torchrun's environment, and the few collectives the trainer needs.

The parallel machinery lives here, outside `parti.training`, so that data (token precompute, the
shapes data) and inference (loading exports, `checkpoint`) never import the trainer.
Plain `python` runs as a world of one; under torchrun every process drives one device (gloo on CPU;
on CUDA, nccl for CUDA tensors and gloo for the few CPU ones, e.g. the stop flag). Multi-node runs
use torchrun's c10d rendezvous: nothing changes here. Under SLURM without torchrun (one task per
GPU, e.g. `hydra/launcher=slurm`), the layout comes from SLURM's environment and the first node of
the allocation is the rendezvous host.
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-010,012],cpu1' -> 'gpu003'."""
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first)


def slurm_layout(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for a SLURM
    task started without torchrun; empty when not under SLURM or when torchrun set them."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist), "MASTER_PORT": port}


def backend_for(device: torch.device) -> str:
    """gloo on the CPU; on CUDA nccl for CUDA tensors and gloo for CPU ones (the stop flag)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed() -> Dist:
    """Join the process group torchrun (or SLURM) describes in the environment, or run alone."""
    os.environ.update(slurm_layout(os.environ))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} has no GPU: {torch.cuda.device_count()} visible on this "
                "node. Start at most that many processes per node (torchrun --nproc_per_node), or "
                "hide the GPUs (CUDA_VISIBLE_DEVICES=) to run every process on the CPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device), rank=rank, world_size=world_size)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown() -> None:
    """Leave the process group (if any), after collecting unreachable objects: ones in reference
    cycles that hold the group or its pending work (FSDP's device mesh, for one) would otherwise
    be freed at interpreter exit, after the group is gone, where gloo can abort the process."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (a copy; the input is unchanged)."""
    out = values.clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def reduce_scalars(scalars: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Mean over ranks of each scalar, in one collective (all ranks pass the same keys)."""
    if not scalars:
        return {}
    keys = sorted(scalars)
    values = torch.stack([torch.as_tensor(scalars[k], dtype=torch.float64, device=device).reshape(())
                          for k in keys])  # device tensors stay there: one read after the sum
    world = dist.get_world_size() if dist.is_initialized() else 1
    values = all_reduce_sum(values) / world
    return dict(zip(keys, values.tolist()))


def sum_dicts(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum over ranks of dicts whose keys may differ between ranks (a missing key counts 0)."""
    if not dist.is_initialized():
        return dict(values)
    gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, sorted(values))
    keys = sorted(set().union(*gathered))
    totals = all_reduce_sum(torch.tensor([float(values.get(k, 0.0)) for k in keys],
                                         dtype=torch.float64, device=device))
    return dict(zip(keys, totals.tolist()))
