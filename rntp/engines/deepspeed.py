"""DeepSpeed ZeRO (stages 1-3): DeepSpeed's own engine, optimizer step and checkpoints.

Its protocol differs from torch's and stays in this class: it steps after every backward and updates
only at the accumulation boundary, so every process runs a fixed number of passes per optimizer step
(`fixed_passes`, even in a world of one), and it steps its scheduler at every optimizer pass (the
schedule is scaled by `grpo.epochs`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from rntp.config import Config
from rntp.distributed import DistInfo, init_process_group
from rntp.engines.base import Engine
from rntp.engines.plain import make_optimizer, make_scheduler


def deepspeed_config(cfg: Config, world_size: int, micro_steps: int) -> dict:
    """The DeepSpeed JSON (`dist.deepspeed_config`, default by ZeRO stage) with the fields that must
    agree with the RNTP config filled in."""
    path = cfg.dist.deepspeed_config or Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / \
        f"zero{cfg.dist.zero_stage}.json"
    ds = json.loads(Path(path).read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch
    ds["gradient_accumulation_steps"] = micro_steps
    ds["train_batch_size"] = cfg.train.micro_batch * micro_steps * world_size
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds.setdefault("zero_optimization", {})["stage"] = cfg.dist.zero_stage
    bf16 = cfg.model.autocast_bf16 or cfg.model.dtype == "bfloat16"
    ds["bf16"] = {"enabled": bf16}
    if bf16:  # summing many micro-batches' gradients in bf16 loses their low bits
        ds.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    ds.setdefault("steps_per_print", 10**9)
    return ds


class DeepSpeedEngine(Engine):
    """`dist.backend=deepspeed` with `dist.zero_stage` 1, 2 or 3."""

    def __init__(self, model: torch.nn.Module, cfg: Config, info: DistInfo, passes: int, total_steps: int):
        import deepspeed

        super().__init__(model, cfg, info, passes, total_steps)
        init_process_group(info.device)  # DeepSpeed then adopts it rather than making its own
        deepspeed.init_distributed(dist_backend="nccl" if info.device.type == "cuda" else "gloo")
        # DeepSpeed steps its scheduler at every optimizer pass (grpo.epochs per training step).
        epochs = cfg.grpo.epochs
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=make_optimizer(self.trainable_parameters(), cfg.optim),
            lr_scheduler=lambda opt: make_scheduler(opt, cfg.optim, total_steps, epochs),
            config=deepspeed_config(cfg, info.world_size, passes), dist_init_required=False)
        self.ds = self.model
        if self.adapter is not None:  # a LoRA run's module state is the adapter alone. exclude_frozen_parameters
            # (save) drops the frozen names named_parameters lists, which keeps a tied head's second name (the
            # whole embedding matrix) in every checkpoint; so the module state is cut to the trained names here.
            trained = {n for n, p in self.raw.named_parameters() if p.requires_grad}
            whole = self.ds.module_state_dict
            self.ds.module_state_dict = lambda *args, **kwargs: {k: v for k, v in whole(*args, **kwargs).items()
                                                                 if k in trained}

    @classmethod
    def shards_weights(cls, cfg: Config) -> bool:
        return cfg.dist.zero_stage == 3

    @property
    def fixed_passes(self) -> int:
        """gradient_accumulation_steps: DeepSpeed updates after exactly this many backward passes."""
        return self.passes

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed's protocol: step after every backward; it updates only at the accumulation
        # boundary (gradient_accumulation_steps = the fixed number of passes per step).
        self.ds.backward(loss, scale_wrt_gas=False)  # the loss is already normalised for the whole step
        self.ds.step()

    def step(self) -> float:
        # it stepped (and clipped) at the boundary inside backward()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def step_scheduler(self) -> None:
        pass  # DeepSpeed steps its scheduler inside engine.step()

    def full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.cfg.dist.zero_stage != 3:
            yield from super().full_tensors()
            return
        import deepspeed

        named = self.pushed_parameters()
        for start in range(0, len(named), 16):  # gather a few parameters at a time
            group = named[start : start + 16]
            unique = list({id(p): p for _, p in group}.values())
            with deepspeed.zero.GatheredParameters(unique):
                part = [(n, p.detach().clone()) for n, p in group]
            yield from part

    def save(self, out_dir: Path) -> dict:
        # with LoRA the frozen base is not state: the adapter, its optimizer and the schedule are
        self.ds.save_checkpoint(str(out_dir / "deepspeed"), tag="state",
                                exclude_frozen_parameters=self.adapter is not None)
        return {}

    def load(self, ckpt_dir: Path, state: dict) -> None:
        self.ds.load_checkpoint(str(ckpt_dir / "deepspeed"), tag="state", load_module_strict=self.adapter is None)
