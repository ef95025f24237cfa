"""One process, no wrapper: torch's AdamW and a transformers schedule on the whole model."""

from __future__ import annotations

from pathlib import Path

import torch

from rntp.config import Config, OptimConfig
from rntp.distributed import DistInfo
from rntp.engines.base import Engine


def make_optimizer(params, o: OptimConfig) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters (clip + step 0.25 s -> 0.08 s for 135M on 2 CPU cores)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=o.fused)


def make_scheduler(optimizer: torch.optim.Optimizer, o: OptimConfig, total_steps: int, passes_per_step: int = 1):
    """`optim.schedule` from `transformers.get_scheduler`, stepped `passes_per_step` times per training
    step (DeepSpeed steps it at every optimizer pass), so every backend follows the same lr per step."""
    from transformers import get_scheduler

    schedule = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[o.schedule]
    return get_scheduler(schedule, optimizer, num_warmup_steps=o.warmup_steps * passes_per_step,
                         num_training_steps=total_steps * passes_per_step)


class PlainEngine(Engine):
    """`dist.backend=none` (and `auto` in a world of one). Subclasses wrap the model (`wrap`) and keep
    this optimizer, backward and step."""

    def __init__(self, model: torch.nn.Module, cfg: Config, info: DistInfo, passes: int, total_steps: int):
        super().__init__(model, cfg, info, passes, total_steps)
        self.model = self.wrap(model)
        self.optimizer = make_optimizer(self.trainable_parameters(), cfg.optim)
        self.scheduler = make_scheduler(self.optimizer, cfg.optim, total_steps)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.info.world_size > 1:
            raise ValueError("dist.backend=none cannot run on several processes; use ddp, deepspeed or fsdp2")
        return model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, optimizer step, zero grads. The scheduler steps separately (once per training step)."""
        norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.cfg.optim.grad_clip)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def step_scheduler(self) -> None:
        self.scheduler.step()

    def save(self, out_dir: Path) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load(self, ckpt_dir: Path, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
