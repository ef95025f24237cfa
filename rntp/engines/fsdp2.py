"""torch FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks."""

from __future__ import annotations

from pathlib import Path

import torch

from rntp.config import Config
from rntp.engines.plain import PlainEngine


def shard_fsdp2(model: torch.nn.Module, cfg: Config) -> None:
    """FSDP2 over each decoder layer, then the rest (embeddings, final norm, head) at the root."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if cfg.model.autocast_bf16 else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one (Llama/Qwen/Mistral-style `model.model.layers`)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        node = model
        for attr in path.split("."):
            node = getattr(node, attr, None)
        if node is not None:
            return list(node)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard with FSDP2")


class FSDP2Engine(PlainEngine):
    """`dist.backend=fsdp2`: the plain optimizer and step on sharded (DTensor) parameters; the
    optimizer state is saved sharded with torch.distributed.checkpoint."""

    @classmethod
    def shards_weights(cls, cfg: Config) -> bool:
        return True

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        shard_fsdp2(model, self.cfg)  # a no-op for a model `load_trainable` sharded as it loaded
        return model

    def save(self, out_dir: Path) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(self.raw, self.optimizer)},
                 checkpoint_id=str(out_dir / "fsdp2"))
        return {"scheduler": self.scheduler.state_dict()}

    def load(self, ckpt_dir: Path, state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        from torch.distributed.fsdp import FSDPModule

        for module in self.raw.modules():  # a forward before this (the start-up self-check, the evaluation
            if isinstance(module, FSDPModule):  # set's difficulty) leaves the root unsharded: its plain
                module.reshard()  # tensors would not match the optimizer state's sharded keys
        target = {"optimizer": get_optimizer_state_dict(self.raw, self.optimizer)}
        dcp.load(target, checkpoint_id=str(ckpt_dir / "fsdp2"))
        set_optimizer_state_dict(self.raw, self.optimizer, target["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
