"""Reward registry: a reward is one decorated function of a `RewardInputs`.

Add a reward with one file and one decorator:

    from rewards import register_reward

    @register_reward("my_reward", "r = ... (formula shown by `rntp rewards`)")
    def my_reward(x: RewardInputs) -> torch.Tensor:  # one value per thought, shape [N]
        return ...

and select it with `reward.name=my_reward reward.modules=[my_module]`. Modifiers (weighted sums,
clipping, a per-token length penalty) apply to
any reward through `reward.*` config keys and `apply_reward_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from rntp.config import RewardConfig


@dataclass(kw_only=True)
class RewardInputs:
    """Everything a reward may use, one row per thought (N = positions x G). Keyword-only: eleven
    fields of similar shapes are too easy to pass in the wrong order."""

    target_ids: torch.Tensor  # [N, H] the true continuation
    target_logprobs: torch.Tensor  # [N, H] log p(y_h | context, thought, y_<h) under the policy
    no_think_logprobs: torch.Tensor  # [N, H] without a thought, under the baseline model (policy/initial/EMA)
    target_pred: torch.Tensor  # [N, H] argmax predictions after the thought (teacher-forced)
    thought_ids: list[list[int]]  # sampled thought ids (the close tag included when the policy wrote it)
    closed: torch.Tensor  # [N] bool
    group: torch.Tensor  # [N] position index
    token_bytes: Callable[[int], bytes] = lambda i: b""  # UTF-8 bytes a token stands for
    decode: Callable[[list[int]], str] = lambda ids: ""
    options: RewardConfig = field(default_factory=RewardConfig)  # the run's reward.* (k, thresholds, ...)
    extra: dict = field(default_factory=dict)

    @property
    def target_greedy(self) -> torch.Tensor:
        return self.target_pred == self.target_ids


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


def reward_names(cfg: RewardConfig) -> list[str]:
    """The rewards a RewardConfig uses (the weighted terms, else the single name), after importing
    `cfg.modules` so that rewards registered there exist."""
    import importlib

    for module in cfg.modules:
        importlib.import_module(module)
    return list(cfg.weights) if cfg.weights else [cfg.name]


def compute_rewards(name: str, inputs: RewardInputs) -> torch.Tensor:
    rewards = get_reward(name).fn(inputs).to(torch.float32)
    if rewards.shape != inputs.closed.shape:
        raise ValueError(f"reward {name!r} returned shape {tuple(rewards.shape)}, "
                         f"expected {tuple(inputs.closed.shape)}")
    return rewards


def apply_reward_config(cfg: RewardConfig, inputs: RewardInputs) -> torch.Tensor:
    """The configured reward: a weighted sum of registered rewards (or one), minus a penalty
    per sampled thought token, then clipped. NaN stays NaN so its group is dropped."""
    if cfg.weights:
        rewards = sum(w * compute_rewards(n, inputs) for n, w in cfg.weights.items())
    else:
        rewards = compute_rewards(cfg.name, inputs)
    if cfg.length_penalty:
        lengths = torch.tensor([float(len(t)) for t in inputs.thought_ids])
        rewards = rewards - cfg.length_penalty * lengths
    if cfg.clip_min is not None or cfg.clip_max is not None:
        rewards = rewards.clamp(min=cfg.clip_min, max=cfg.clip_max)
    return rewards
