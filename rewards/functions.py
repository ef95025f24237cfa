"""Built-in rewards. Each docstring gives the formula and its source."""

from __future__ import annotations

import torch

from rewards.registry import RewardInputs, register_reward


@register_reward("target_logprob", "r = sum_h log p(y_h | x, <think> z </think>, y_<h)")
def target_logprob(x: RewardInputs) -> torch.Tensor:
    """Summed log-likelihood of the H true tokens after the thought (the RNTP default;
    log-probability of the reference is the robust choice per arXiv 2602.03979)."""
    return x.target_logprobs.sum(-1)


@register_reward("target_logprob_mean", "r = (1/H) sum_h log p(y_h | x, z, y_<h)")
def target_logprob_mean(x: RewardInputs) -> torch.Tensor:
    """Per-token mean log-likelihood of the true continuation."""
    return x.target_logprobs.mean(-1)


@register_reward("info_gain", "r = (1/H) sum_h [log p(y_h | x, z, y_<h) - log p(y_h | x, y_<h)]")
def info_gain(x: RewardInputs) -> torch.Tensor:
    """Gain over the no-think score of the current policy, nats per target token (RLP,
    arXiv 2510.01265, uses an EMA teacher as the baseline). The baseline is constant in a
    group, so group-normalised advantages equal those of target_logprob_mean."""
    return (x.target_logprobs - x.no_think_logprobs).mean(-1)
