"""The sampler interface and the factory that picks vLLM where it is installed."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

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


def thought_request(spec: SamplingSpec, index: int, close_tag: str) -> dict:
    """vLLM's sampling fields for the `index`-th prompt of a call, the same in-process and over HTTP.

    Seeds: vLLM seeds each sample's generator, and gives sample j of an n-sample request the seed
    `seed + j` (vllm/v1/engine/parallel_sampling.py), so each prompt gets its own block of n seeds;
    no two samples of a call share one (seed + 1 for the next prompt would repeat its sample 1).
    Sampling: only temperature and top_p shape it. The other fields are sent with vLLM's neutral
    values, since a server fills each field a request leaves unset from the model's
    generation_config.json (top_k, min_p, penalties), which would sample off-policy.
    A thought ends at the close tag or the budget, never at EOS. `logprobs=0`: the log-prob of each
    sampled token comes back with it (the engines run in vLLM's processed_logprobs mode, so these are
    the behaviour log-probs, after temperature and top-p)."""
    return dict(n=spec.n, max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p, logprobs=0,
                top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                seed=(spec.seed * 1_000_003 + index) * spec.n, stop=[close_tag], include_stop_str_in_output=True,
                ignore_eos=True)


Bucket = list[tuple[str, torch.Tensor]]


@dataclass
class WeightStream:
    """One round of the trainer's full weights for a sampler: buckets of (name, full tensor), made
    on demand by `buckets` (gathering from shards is collective, so every rank iterates), and
    `metadata`, what they will hold: (name, dtype, full shape) in order, known without gathering."""

    buckets: Callable[[], Iterator[Bucket]]
    metadata: list[tuple[str, torch.dtype, tuple[int, ...]]]
    bucket_mb: float = 256  # about how large `buckets` makes them; a transport that re-packs follows it

    @classmethod
    def of_module(cls, model: torch.nn.Module, bucket_mb: float = 256) -> "WeightStream":
        """An unsharded model's weights, tied names included, as one bucket (a transport that
        re-packs cuts it at `bucket_mb`)."""
        named = list(model.named_parameters(remove_duplicate=False))
        return cls(lambda: iter([[(n, p.detach()) for n, p in named]]),
                   [(n, p.dtype, tuple(p.shape)) for n, p in named], bucket_mb)

    def __iter__(self) -> Iterator[Bucket]:
        return self.buckets()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in self:
            yield from bucket

    def tap(self, fn: Callable[[Bucket], None]) -> "WeightStream":
        """The same stream, calling `fn` on each bucket as it passes (one gather serves both)."""
        def buckets():
            for bucket in self.buckets():
                fn(bucket)
                yield bucket
        return WeightStream(buckets, self.metadata, self.bucket_mb)


class Sampler(Protocol):
    tags: ThinkTags

    def sample(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Rollout]:
        """G rollouts per prompt, grouped in prompt order (group index = prompt index)."""

    def push_weights(self, weights: WeightStream) -> None:
        """Make the sampler use these weights from the next `sample` on. Every rank calls it."""

    def sleep(self) -> None:
        """Free accelerator memory until the next `sample` or `push_weights`, where supported."""

    def close(self) -> None: ...


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def engine_dtype(model_dtype: str, vllm_cfg) -> str:
    """A vLLM engine's dtype, in-process or served: `rollout.vllm.dtype`, or the trainer's for auto."""
    choice = getattr(vllm_cfg, "dtype", "auto")
    return model_dtype if choice == "auto" else choice


def cpu_kv_cache_space(vllm_cfg) -> str:
    """VLLM_CPU_KVCACHE_SPACE (whole GiB, at least 1) for `rollout.vllm.kv_cache_gb`."""
    return str(max(1, round(getattr(vllm_cfg, "kv_cache_gb", 2))))


def make_sampler(kind: str, model_path: str, tags: ThinkTags, *, policy=None, dtype: str = "float32",
                 seed: int = 0, max_model_len: int = 2048, vllm_cfg=None, server_cfg=None) -> Sampler:
    """kind: "vllm", "hf", "server" or "auto" (vLLM where installed, else transformers)."""
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
        log.info("sampler: %s", kind)
    if kind == "vllm":
        from rollout.vllm_sampler import VLLMSampler

        return VLLMSampler(model_path, tags, dtype=engine_dtype(dtype, vllm_cfg), seed=seed,
                           max_model_len=max_model_len, cfg=vllm_cfg)
    if kind == "hf":
        from rollout.hf_sampler import HFSampler

        if policy is None:
            raise ValueError("the transformers sampler samples from the training model: pass policy=")
        return HFSampler(policy, tags)
    if kind == "server":
        from rollout.server import ServerSampler

        return ServerSampler(server_cfg, tags)
    raise ValueError(f"unknown sampler {kind!r}; choose auto, vllm, hf or server")
