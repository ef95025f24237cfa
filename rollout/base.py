"""The sampler interface and the factory that picks vLLM where it is installed."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from rollout.spans import Rollout, ThinkTags

log = logging.getLogger(__name__)


@dataclass
class SamplingSpec:
    n: int  # thoughts per prompt (G)
    max_tokens: int  # thought budget (T)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # with the same weights and seed, a sampler returns the same thoughts


class Sampler(Protocol):
    tags: ThinkTags

    def sample(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Rollout]:
        """G rollouts per prompt, grouped in prompt order (group index = prompt index)."""

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Make the sampler use these weights from the next `sample` on."""

    def close(self) -> None: ...


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_sampler(kind: str, model_path: str, tags: ThinkTags, *, policy=None, dtype: str = "float32",
                 seed: int = 0, max_model_len: int = 2048, vllm_cfg=None) -> Sampler:
    """kind: "vllm", "hf" or "auto" (vLLM where installed, else transformers)."""
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
        log.info("sampler: %s", kind)
    if kind == "vllm":
        from rollout.vllm_sampler import VLLMSampler

        return VLLMSampler(model_path, tags, dtype=dtype, seed=seed, max_model_len=max_model_len, cfg=vllm_cfg)
    if kind == "hf":
        from rollout.hf_sampler import HFSampler

        if policy is None:
            raise ValueError("the transformers sampler samples from the training model: pass policy=")
        return HFSampler(policy, tags)
    raise ValueError(f"unknown sampler {kind!r}; choose auto, vllm or hf")
