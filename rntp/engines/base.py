"""The training engine's interface: the policy being trained, wrapped by one backend (plain, DDP,
DeepSpeed ZeRO, FSDP2; one class each beside this file, chosen by `rntp.engines.make_engine`).

Gradients are averaged across ranks by every backend, so each rank scales its share of the
globally normalised loss by the world size (see `rntp.train.update_policy`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

import torch

from rntp import lora
from rntp.config import Config
from rntp.distributed import DistInfo
from rntp.engines.weights import layer_buckets
from rollout.adapter import save_adapter
from rollout.base import WeightStream


class Engine(ABC):
    """The policy being trained, wrapped by a backend.

    - `model`: call it for forward passes.
    - `backward(loss)` per micro-batch, then `step()` once per optimizer step (returns grad norm),
      then `step_scheduler()` once per training step. Each micro-batch's forward and backward run in
      `micro_pass(last)`, `last` true for the one just before `step()`.
    - `fixed_passes`: how many forward/backward passes every rank must run per optimizer step, or
      None when a rank may run as many as its rows need (see `update_policy`).
    - `weights()`: full (unsharded) weights in buckets, on every rank, for the sampler; with LoRA
      (`adapter` set) the adapter's tensors only, under PEFT's names.
    - `save(dir)` / `load(dir)`: backend-native sharded state (optimizer included);
      `export(dir, tokenizer)`: a consolidated Hugging Face folder, written by rank 0 (with LoRA, the
      adapter in PEFT's format).
    - `close()`: at the end of a run, before the process group goes.

    `passes` is the number of micro-batch passes one optimizer step takes at most (the rows a rank
    holds over `train.micro_batch`); `total_steps` sets the learning-rate schedule's length.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, info: DistInfo, passes: int, total_steps: int):
        self.cfg, self.info, self.passes, self.total_steps = cfg, info, passes, total_steps
        self.raw = model  # the unwrapped model (parameters, state dict, save_pretrained)
        self.model: torch.nn.Module = model  # what forward passes call (the backend's wrapper)
        self.optimizer: torch.optim.Optimizer
        self.scheduler: torch.optim.lr_scheduler.LRScheduler
        # model.lora: adapter_config.json's contents (the adapter is what trains, moves and is saved)
        self.adapter: dict | None = lora.adapter_config(model) if lora.is_peft(model) else None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer steps: every parameter, or with LoRA the adapter's."""
        return [p for p in self.raw.parameters() if p.requires_grad]

    def pushed_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """What the sampler gets, by name: every parameter (tied names included), or with LoRA the
        adapter's under PEFT's saved names."""
        if self.adapter is not None:
            return lora.trainable(self.raw)
        return list(self.raw.named_parameters(remove_duplicate=False))

    @classmethod
    def shards_weights(cls, cfg: Config) -> bool:
        """Whether no rank holds the whole model (then generation needs a separate whole copy)."""
        return False

    @property
    def fixed_passes(self) -> int | None:
        """Several ranks run every collective in step, so each runs exactly `passes`."""
        return self.passes if self.info.world_size > 1 else None

    # -- training --------------------------------------------------------------------------------
    def micro_pass(self, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward; `last`: the optimizer step's last. A backend
        that averages gradients in backward may skip that for all but the last (DDP's no_sync)."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> float:
        """Clip, optimizer step, zero grads; the gradient norm before clipping."""

    @abstractmethod
    def step_scheduler(self) -> None:
        """Once per training step, after `step`."""

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self, mode: bool = True) -> None:
        self.raw.train(mode)

    def close(self) -> None:
        """Drop the backend's wrapper while the process group still exists (call before
        `shutdown_distributed`). DDP's reducer holds the group from C++; if it let go of the last
        reference, gloo's destructor would join its worker threads with the GIL held while one waits
        for the GIL to free a finished collective: a hang at the end of the run (pytorch/pytorch#56297).
        The group's own Python object releases the GIL when it is destroyed."""
        self.model = self.raw

    # -- weights -----------------------------------------------------------------------------------
    def weights(self, bucket_mb: float = 256) -> WeightStream:
        """This step's weights for the sampler: buckets on demand, and their names, dtypes and full
        shapes known without gathering (ZeRO-3 keeps the full shape as `ds_shape`, a DTensor's
        shape is global)."""
        metadata = [(name, p.dtype, tuple(getattr(p, "ds_shape", p.shape))) for name, p in self.pushed_parameters()]
        return WeightStream(lambda: self.weight_buckets(bucket_mb), metadata, bucket_mb, adapter=self.adapter)

    def weight_buckets(self, bucket_mb: float = 256) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full weights in buckets of about `bucket_mb`, gathered from shards where sharded, cut only
        between layers (see `layer_buckets`). Every rank must iterate (gathering is collective); each
        gets the full tensors. Tied weights come under every name (vLLM keeps its own copy of a tied
        `lm_head.weight`)."""
        return layer_buckets(self.full_tensors(), bucket_mb)

    def full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) for every pushed parameter, tied names included; a DTensor is gathered."""
        for name, p in self.pushed_parameters():
            yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on CPU, keyed as the model's own state_dict (tied names included), on rank 0;
        the other ranks take part in the gathers and keep nothing (empty dict). With LoRA: the adapter's,
        under PEFT's saved names."""
        keys = set(self.raw.state_dict()) if self.adapter is None else None
        out = {}
        for name, tensor in self.full_tensors():
            if self.info.is_main and (keys is None or name in keys):
                out[name] = tensor.cpu()
        return out

    # -- checkpoints ---------------------------------------------------------------------------------
    def export(self, out_dir: Path, tokenizer) -> None:
        """Consolidated Hugging Face folder (rank 0 writes; every rank must call); with LoRA the adapter
        alone, in PEFT's format (`rntp export` merges it into its base)."""
        if self.adapter is not None:
            tensors = dict(self.full_tensors())
            if self.info.is_main:
                save_adapter(out_dir, tensors, self.adapter)
                tokenizer.save_pretrained(out_dir)
            return
        state = self.full_state_dict()
        if self.info.is_main:
            self.raw.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(out_dir)

    @abstractmethod
    def save(self, out_dir: Path) -> dict:
        """Optimizer/scheduler state: a dict for trainer_state.pt, or sharded files written by every
        rank beside it (then the dict holds what is left)."""

    @abstractmethod
    def load(self, ckpt_dir: Path, state: dict) -> None:
        """Restore what `save` wrote (`state` is trainer_state.pt's engine part)."""
