"""Training engines, one class per backend behind `Engine` (`base.py`), chosen once here.

    none       plain.PlainEngine          one process
    ddp        ddp.DDPEngine              torch DistributedDataParallel
    deepspeed  deepspeed.DeepSpeedEngine  DeepSpeed ZeRO 1-3
    fsdp2      fsdp2.FSDP2Engine          torch FSDP2

Nothing home-made: each is the library's own engine; the classes give them a common shape
(backward, step, full weights in buckets, save, load).
"""

from __future__ import annotations

import torch

from rntp.config import Config
from rntp.distributed import DistInfo
from rntp.engines.base import Engine
from rntp.engines.ddp import DDPEngine
from rntp.engines.deepspeed import DeepSpeedEngine, deepspeed_config
from rntp.engines.fsdp2 import FSDP2Engine, decoder_layers, shard_fsdp2
from rntp.engines.plain import PlainEngine
from rntp.engines.weights import layer_buckets, layer_of

ENGINES: dict[str, type[Engine]] = {"none": PlainEngine, "ddp": DDPEngine, "deepspeed": DeepSpeedEngine,
                                    "fsdp2": FSDP2Engine}

__all__ = ["ENGINES", "Engine", "PlainEngine", "DDPEngine", "DeepSpeedEngine", "FSDP2Engine", "engine_class",
           "make_engine", "resolve_backend", "deepspeed_config", "shard_fsdp2", "decoder_layers", "layer_buckets",
           "layer_of"]


def resolve_backend(cfg: Config, world_size: int) -> str:
    """`dist.backend`, with auto resolved: DDP on several processes, plain on one."""
    if cfg.dist.backend == "auto":
        return "ddp" if world_size > 1 else "none"
    return cfg.dist.backend


def engine_class(cfg: Config, world_size: int) -> type[Engine]:
    backend = resolve_backend(cfg, world_size)
    if backend not in ENGINES:
        raise ValueError(f"unknown dist.backend {backend!r}")
    return ENGINES[backend]


def make_engine(model: torch.nn.Module, cfg: Config, info: DistInfo, passes: int, total_steps: int) -> Engine:
    """The configured backend's engine around `model` (see `Engine` for `passes` and `total_steps`)."""
    return engine_class(cfg, info.world_size)(model, cfg, info, passes, total_steps)
