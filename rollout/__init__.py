"""Samplers behind one interface, think-span formatting, and weight push to the sampler.

This package never imports the training loop: it takes prompts as token ids and hands
back `Rollout` records.
"""

from rollout.spans import Rollout, ThinkTags
from rollout.base import Sampler, SamplingSpec, make_sampler

__all__ = ["Rollout", "ThinkTags", "Sampler", "SamplingSpec", "make_sampler"]
