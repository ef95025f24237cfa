"""Cutting a stream of full weights into buckets for the sampler, only between layers."""

from __future__ import annotations

from typing import Iterator

import torch


def layer_of(name: str) -> str:
    """The unit a weight belongs to: its decoder layer ("model.layers.3") or, outside the layers, itself."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def layer_buckets(tensors: Iterator[tuple[str, torch.Tensor]], bucket_mb: float) -> Iterator[list]:
    """Buckets of about `bucket_mb`, closed only where a layer ends: a receiver that loads bucket by
    bucket then always holds a layer's q/k/v and gate/up together (vLLM fuses them)."""
    bucket, size, limit = [], 0, bucket_mb * 2**20
    for name, tensor in tensors:
        if bucket and size >= limit and layer_of(name) != layer_of(bucket[-1][0]):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
    if bucket:
        yield bucket
