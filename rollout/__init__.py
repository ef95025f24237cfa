"""Samplers behind one interface, think-span formatting, and weight push to the sampler.

This package never imports the training loop: it takes prompts as token ids and hands
back `Rollout` records. `base.py` holds the interface and its records; `make_sampler` (here)
picks an implementation.
"""

from __future__ import annotations

import logging
from rntp.config import ServerConfig, VllmConfig
from rollout.base import Sampler, SamplingSpec, WeightStream
from rollout.spans import Rollout, ThinkTags
from rollout.vllm_utils import engine_dtype, vllm_available

log = logging.getLogger(__name__)

__all__ = ["Rollout", "ThinkTags", "Sampler", "SamplingSpec", "WeightStream", "make_sampler"]


def make_sampler(kind: str, model_path: str, tags: ThinkTags, *, policy=None, dtype: str = "float32",
                 seed: int = 0, max_model_len: int = 2048, vllm_cfg: VllmConfig | None = None,
                 server_cfg: ServerConfig | None = None, lora_rank: int | None = None) -> Sampler:
    """kind: "vllm", "hf", "server" or "auto" (vLLM where installed, else transformers). `lora_rank`: a LoRA
    run's adapter rank (vLLM engines then serve the pushed adapter on the base at `model_path`)."""
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
        log.info("sampler: %s", kind)
    if kind == "vllm":
        from rollout.vllm_sampler import VLLMSampler

        vllm_cfg = vllm_cfg if vllm_cfg is not None else VllmConfig()
        return VLLMSampler(model_path, tags, dtype=engine_dtype(dtype, vllm_cfg), seed=seed,
                           max_model_len=max_model_len, cfg=vllm_cfg, lora_rank=lora_rank)
    if kind == "hf":
        from rollout.hf_sampler import HFSampler

        if policy is None:
            raise ValueError("the transformers sampler samples from the training model: pass policy=")
        return HFSampler(policy, tags)
    if kind == "server":
        from rollout.server import ServerSampler

        if server_cfg is None:
            raise ValueError("the server sampler needs server_cfg= (rollout.server: the servers' urls)")
        return ServerSampler(server_cfg, tags)
    raise ValueError(f"unknown sampler {kind!r}; choose auto, vllm, hf or server")
