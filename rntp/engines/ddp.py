"""torch DistributedDataParallel: a whole model per rank, gradients averaged in backward, once per
optimizer step (the other micro-passes accumulate locally under `no_sync`)."""

from __future__ import annotations

import contextlib

import torch

from rntp.engines.plain import PlainEngine


class DDPEngine(PlainEngine):
    """`dist.backend=ddp` (and `auto` on several processes)."""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.info.local_rank] if self.info.device.type == "cuda"
                                       else None)

    def micro_pass(self, last: bool) -> contextlib.AbstractContextManager:
        # One all-reduce per optimizer step, not per micro-pass: the sum of local gradients averaged
        # once is the average of the sums. no_sync must cover the forward too (DDP decides there).
        return contextlib.nullcontext() if last else self.model.no_sync()
