"""The sampler interface and the records it exchanges (sampling spec, weight stream); the factory
that picks a sampler is `rollout.make_sampler`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

from rollout.spans import Rollout, ThinkTags


@dataclass
class SamplingSpec:
    n: int  # thoughts per prompt (G)
    max_tokens: int  # thought budget (T)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # with the same weights and seed, a sampler returns the same thoughts
    seeded: bool = True  # vLLM: a seed on every request (False: the engine's own generator; see thought_request)


Bucket = list[tuple[str, torch.Tensor]]


@dataclass
class WeightStream:
    """One round of the trainer's full weights for a sampler: buckets of (name, full tensor), made
    on demand by `buckets` (gathering from shards is collective, so every rank iterates), and
    `metadata`, what they will hold: (name, dtype, full shape) in order, known without gathering.
    With `adapter` (a LoRA run: adapter_config.json's contents) the tensors are the adapter's alone,
    under PEFT's saved names; the sampler serves them on the base it holds."""

    buckets: Callable[[], Iterator[Bucket]]
    metadata: list[tuple[str, torch.dtype, tuple[int, ...]]]
    bucket_mb: float = 256  # about how large `buckets` makes them; a transport that re-packs follows it
    adapter: dict | None = None

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
        return WeightStream(buckets, self.metadata, self.bucket_mb, self.adapter)


class Sampler(Protocol):
    tags: ThinkTags

    def sample(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Rollout]:
        """G rollouts per prompt, grouped in prompt order (group index = prompt index)."""

    def push_weights(self, weights: WeightStream) -> None:
        """Make the sampler use these weights from the next `sample` on. Every rank calls it."""

    def sleep(self) -> None:
        """Free accelerator memory until the next `sample` or `push_weights`, where supported."""

    def close(self) -> None: ...
