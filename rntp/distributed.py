"""Process group set-up and the collectives the loop uses (metrics, stop requests, checkpoints).
The training engines (plain, DDP, DeepSpeed ZeRO, FSDP2) are in `rntp/engines/`.

Launch with torchrun (`torchrun --nproc-per-node N -m rntp train ...`); a plain `python -m rntp`
is a world of one. Gradients are averaged across ranks by every backend, so each rank scales its
share of the globally normalised loss by the world size (see `update_policy`).
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rollout.net import free_port

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_group_backend(device_type: str) -> str:
    """The backend of the default group. On GPUs it serves both devices: NCCL for CUDA tensors
    (gradients, gathered weights) and gloo for the CPU tensors and pickled objects that metrics,
    stop requests and checkpoints exchange; NCCL alone cannot reduce a CPU tensor."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init_process_group(device: torch.device) -> None:
    """Create the default group once (torchrun's environment, or a world of one for DeepSpeed,
    which needs a group even then and would otherwise make an NCCL-only one itself)."""
    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group(process_group_backend(device.type))


def init_distributed() -> DistInfo:
    """Join the torchrun process group (see `process_group_backend`) and make RNTP's own group for
    its CPU collectives (`collective_group`); a world of one otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    if world > 1:
        init_process_group(device)
        collective_group()  # now, on every rank alike, before any engine makes groups of its own
    rank = dist.get_rank() if world > 1 else 0
    return DistInfo(rank, world, local_rank, device)


_group = None  # RNTP's gloo group, made once the world has several ranks


def collective_group():
    """The group RNTP's metrics, stop requests and checkpoint objects travel on (CPU tensors and pickled
    objects), or None in a world of one, where they stay local. RNTP owns it rather than trusting the
    default group: whoever made that may have made it for CUDA tensors alone. vLLM's in-process engine
    on a GPU makes an NCCL-only default group in a world of one (`init_worker_distributed_environment`
    with the platform's "nccl"), on which a CPU tensor's collective raises."""
    global _group
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    if _group is None:
        _group = dist.new_group(backend="gloo")
    return _group


def barrier() -> None:
    group = collective_group()
    if group is not None:
        dist.barrier(group=group)


def shutdown_distributed() -> None:
    """Leave the process group together. A rank that exits while its peers still use the group can
    abort at interpreter exit (SIGABRT), failing a run whose work is done. Close the engine first
    (`Engine.close`): what still holds the group from C++ must let go while it is registered. The
    default group goes too, whoever made it (in a world of one, an in-process vLLM engine's)."""
    global _group
    if dist.is_initialized():
        gc.collect()  # wrappers caught in reference cycles go now, not after the group is destroyed
        barrier()
        dist.destroy_process_group()  # every group, RNTP's own included
    _group = None


def all_reduce_sum(values: list[float]) -> list[float]:
    group = collective_group()
    if group is None:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.tolist()


def all_gather_object(obj) -> list:
    group = collective_group()
    if group is None:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj):
    group = collective_group()
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
