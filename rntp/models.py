"""Loading models: a whole model on one device (frozen copies, evaluation), or the policy to train,
built so that no rank holds more than its share of the weights where the backend shards them.

- FSDP2: every rank builds the model with its parameters on the meta device, shards it, and
  materialises only its shards; rank 0 reads the checkpoint and broadcasts it into the shards
  (torch's `set_model_state_dict(..., broadcast_from_rank0=True)`).
- DeepSpeed ZeRO-3: transformers builds the model under `deepspeed.zero.Init` while an
  `HfDeepSpeedConfig` is alive, which partitions each layer as it is made and loads rank 0's
  weights into the partitions.
- Otherwise every rank holds the whole model (DDP and ZeRO-1/2 keep a full copy per rank anyway).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rntp.config import Config
from rntp.distributed import DistInfo, init_process_group
from rntp.engines import deepspeed_config, resolve_backend, shard_fsdp2


def torch_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32


def load_policy(path: str, cfg: Config, device: torch.device | None = None):
    """The whole model on one device."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(cfg),
                                                 trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_trainable(path: str, cfg: Config, info: DistInfo, micro_steps: int, adapter: str | None = None):
    """The policy to train, for `Engine` (see the module docstring). With `model.lora` it is the base at
    `path` wrapped in a fresh PEFT adapter (`rntp.lora`), or in the adapter saved in `adapter` (a resumed
    checkpoint); the config refuses LoRA on the sharded backends."""
    backend = resolve_backend(cfg, info.world_size)
    if backend == "fsdp2":
        return _load_fsdp2(path, cfg, info)
    if backend == "deepspeed" and cfg.dist.zero_stage == 3:
        return _load_zero3(path, cfg, info, micro_steps)
    model = load_policy(path, cfg, info.device)
    if cfg.model.lora.enabled:
        from rntp import lora

        model = lora.wrap(model, cfg.model.lora, base_path=path)
        if adapter is not None:
            lora.load_adapter_weights(model, adapter)
    return model


def _load_fsdp2(path: str, cfg: Config, info: DistInfo):
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(cfg),
                                                 trust_remote_code=cfg.model.trust_remote_code)
    model.tie_weights()  # from_config leaves a tied head untied on meta; FSDP2 then shards one object
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    shard_fsdp2(model, cfg)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # a tied head stays the embedding's object
    try:
        model.to_empty(device=info.device)  # storage for this rank's shards only (buffers too: restored below)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    full = load_policy(path, cfg, torch.device("cpu")).state_dict() if info.is_main else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def _load_zero3(path: str, cfg: Config, info: DistInfo, micro_steps: int):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    init_process_group(info.device)
    deepspeed.init_distributed(dist_backend="nccl" if info.device.type == "cuda" else "gloo")
    # transformers builds under zero.Init only while this object lives (a weak reference): the frozen
    # copies loaded later (initial model, EMA teacher) stay whole.
    zero3 = HfDeepSpeedConfig(deepspeed_config(cfg, info.world_size, micro_steps))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(cfg),
                                                 trust_remote_code=cfg.model.trust_remote_code)
    del zero3
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model
