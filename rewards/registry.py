"""Reward registry: a reward is one decorated function of a `RewardInputs`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class RewardInputs:
    """Everything a reward may use, one row per thought (N = positions x G)."""

    target_logprobs: torch.Tensor  # [N, H] with the thought
    no_think_logprobs: torch.Tensor  # [N, H] without a thought (the same row for a whole group)
    target_greedy: torch.Tensor  # [N, H] greedy prediction after the thought is right
    thought_ids: list[list[int]]  # sampled thought ids (close tag included when the policy wrote it)
    closed: torch.Tensor  # [N] bool
    group: torch.Tensor  # [N] group (position) index


RewardFn = Callable[[RewardInputs], torch.Tensor]


@dataclass
class RewardSpec:
    name: str
    formula: str
    fn: RewardFn


REWARDS: dict[str, RewardSpec] = {}


def register_reward(name: str, formula: str):
    """Decorator: `@register_reward("my_reward", "r = ...")` makes `reward.name=my_reward` work."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = RewardSpec(name, formula, fn)
        return fn

    return wrap


def get_reward(name: str) -> RewardSpec:
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered rewards: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def compute_rewards(name: str, inputs: RewardInputs) -> torch.Tensor:
    rewards = get_reward(name).fn(inputs).to(torch.float32)
    if rewards.shape != inputs.closed.shape:
        raise ValueError(f"reward {name!r} returned shape {tuple(rewards.shape)}, expected {tuple(inputs.closed.shape)}")
    return rewards
