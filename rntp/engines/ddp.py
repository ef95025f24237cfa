"""torch DistributedDataParallel: a whole model per rank, gradients averaged in backward."""

from __future__ import annotations

import torch

from rntp.engines.plain import PlainEngine


class DDPEngine(PlainEngine):
    """`dist.backend=ddp` (and `auto` on several processes)."""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.info.local_rank] if self.info.device.type == "cuda"
                                       else None)
