"""GRPO maths as pure functions of tensors: advantages, the clipped surrogate, aggregation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Reduce = Callable[[list[float]], list[float]]  # sums a list of floats over ranks (all_reduce_sum)


# Bound on log-ratios that are exponentiated (e^20 ~ 5e8, far beyond any clip range; well inside
# float32), so log-probs floored at rntp.forward.packing.LOGP_FLOOR cannot overflow to inf or NaN.
MAX_LOG_RATIO = 20.0


def local_sum(values: list[float]) -> list[float]:
    """The `reduce` of a single process: the values as they are."""
    return values


def finite_groups(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Bool [N]: the thought's whole group has finite rewards (a NaN/inf drops its group)."""
    bad = torch.zeros(int(group.max()) + 1, dtype=torch.bool)
    bad.index_put_((group,), ~torch.isfinite(rewards), accumulate=True)
    return ~bad[group]


def group_advantages(rewards: torch.Tensor, group: torch.Tensor, scale: str = "group", eps: float = 1e-6, *,
                     reduce: Reduce = local_sum) -> torch.Tensor:
    """A_i = r_i - mean(r in i's group), divided by the group's std ("group", GRPO), the batch
    std of those differences ("batch"), or nothing ("none", Dr. GRPO). Std is unbiased.

    The batch std comes from a count, a sum and a sum of squares passed through `reduce`; under
    torchrun `rntp.distributed.all_reduce_sum` makes it the std over every rank's batch (every rank
    must then call, even with no rows)."""
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown advantage scale {scale!r}")
    if rewards.numel() == 0:
        centred = rewards
    else:
        n_groups = int(group.max()) + 1
        counts = torch.bincount(group, minlength=n_groups).to(rewards.dtype)
        mean = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, rewards) / counts
        centred = rewards - mean[group]
    if scale == "none":
        return centred
    if scale == "group":
        return centred / (group_std(rewards, group)[group] + eps) if rewards.numel() else centred
    std = pooled_std(*reduce([float(centred.numel()), float(centred.sum()), float((centred**2).sum())]))
    return centred / (std + eps)


@dataclass
class Advantages:
    """What the update needs from a batch's rewards: one advantage per thought, which thoughts it
    keeps, and how many groups this batch dropped and why."""

    values: torch.Tensor  # [N], 0 for dropped thoughts
    keep: torch.Tensor  # [N] bool
    dropped_nonfinite: int  # groups with a NaN/inf reward
    dropped_low_spread: int  # groups whose reward std is at most min_group_std (dynamic sampling)


def advantages(rewards: torch.Tensor, group: torch.Tensor, *, scale: str = "group", min_group_std: float = 0.0,
               drop_negative: bool = False, reduce: Reduce = local_sum, eps: float = 1e-6) -> Advantages:
    """Group-relative advantages of one batch, as the update uses them.

    1. A group with a NaN/inf reward is dropped whole (`finite_groups`).
    2. Dynamic sampling on spread: with `min_group_std` > 0, so is a group whose reward std is at
       most that (rewards are continuous: spread, not an all-equal test).
    3. The kept groups' advantages by `group_advantages` (`scale`; "batch" over every rank through
       `reduce`).
    4. `drop_negative` clamps them at 0 (Quiet-STaR keeps only thoughts that beat their group).
    """
    n_groups = len(torch.unique(group))
    keep = finite_groups(rewards, group)
    dropped_nonfinite = n_groups - len(torch.unique(group[keep]))
    dropped_low_spread = 0
    if min_group_std > 0 and keep.any():
        spread = group_std(torch.where(keep, rewards, 0.0), group) > min_group_std
        dropped_low_spread = len(torch.unique(group[~spread[group] & keep]))
        keep &= spread[group]
    values = torch.zeros_like(rewards)
    _, kept_group = torch.unique(group[keep], return_inverse=True)
    values[keep] = group_advantages(rewards[keep], kept_group, scale, eps, reduce=reduce)
    if drop_negative:
        values = values.clamp(min=0)
    return Advantages(values, keep, dropped_nonfinite, dropped_low_spread)


def pooled_std(n: float, total: float, squares: float) -> float:
    """Unbiased std from a count, a sum and a sum of squares (what ranks can all-reduce); 0 for n < 2."""
    if n < 2:
        return 0.0
    return math.sqrt(max(squares - total * total / n, 0.0) / (n - 1))


def group_std(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Unbiased reward std of each group, [n_groups]."""
    n_groups = int(group.max()) + 1
    counts = torch.bincount(group, minlength=n_groups).to(rewards.dtype)
    mean = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, rewards) / counts
    var = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, (rewards - mean[group]) ** 2)
    return (var / (counts - 1).clamp(min=1)).sqrt()


def zero_spread_fraction(rewards: torch.Tensor, group: torch.Tensor, tol: float = 1e-6) -> float:
    """Fraction of groups whose rewards are all equal (within tol): they carry no signal. Only ids
    that have rows count (dropped groups leave holes in the ids)."""
    n_groups = int(group.max()) + 1
    hi = torch.full((n_groups,), -torch.inf, dtype=rewards.dtype).scatter_reduce(0, group, rewards, "amax")
    lo = torch.full((n_groups,), torch.inf, dtype=rewards.dtype).scatter_reduce(0, group, rewards, "amin")
    present = torch.bincount(group, minlength=n_groups) > 0
    return float(((hi - lo) <= tol)[present].float().mean())


@dataclass
class LossNorm:
    """Batch-wide normalisers, so micro-batch losses add up to the loss of the whole batch."""

    mode: str  # seq_mean | token_mean | token_sum
    num_seqs: int
    num_tokens: int
    max_tokens: int  # the thought budget T, Dr. GRPO's constant

    @classmethod
    def of(cls, mode: str, mask: torch.Tensor, max_tokens: int) -> "LossNorm":
        return cls(mode, int(mask.shape[0]), int(mask.sum()), max_tokens)


def aggregate(token_values: torch.Tensor, mask: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    """This micro-batch's share of the batch loss.

    seq_mean (GRPO): mean over each sequence's tokens, then over sequences.
    token_mean (DAPO): mean over all tokens of the batch.
    token_sum (Dr. GRPO): sum over tokens / (sequences x T), a constant normaliser.
    """
    masked = token_values * mask
    if norm.mode == "seq_mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / norm.num_seqs
    if norm.mode == "token_mean":
        return masked.sum() / max(norm.num_tokens, 1)
    if norm.mode == "token_sum":
        return masked.sum() / (norm.num_seqs * norm.max_tokens)
    raise ValueError(f"unknown loss aggregation {norm.mode!r}")


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO/GRPO loss -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) and where the
    clip is active. `advantages` is per sequence [B]; log-probs are [B, L].

    The log-ratio is bounded to +-MAX_LOG_RATIO before it is exponentiated: a log-prob floored at
    LOGP_FLOOR (a token outside the top-p nucleus re-entering it with grpo.epochs > 1) would give
    exp(~1e4) = inf, then inf * 0 = NaN in the loss and its gradient. Beyond the bound the ratio is far
    outside any clip range, so the clipped branch is chosen where PPO clips, and elsewhere (the
    pessimistic unclipped side) the value stays finite and the gradient is zero."""
    ratio = torch.exp((logp - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    adv = advantages[:, None]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(q - p) - (q - p) - 1 with p = log pi, q = log ref (>= 0).

    q - p is bounded above by MAX_LOG_RATIO, where it is exponentiated: a policy log-prob floored at
    LOGP_FLOOR against an unfloored reference would give exp(~1e4) = inf. Beyond the bound the estimate
    is saturated (finite, no gradient); below it (the reference floored) exp underflows to 0 harmlessly
    and the estimate and its gradient are exact."""
    delta = (ref_logp - logp).clamp(max=MAX_LOG_RATIO)
    return torch.exp(delta) - delta - 1


def importance_weights(log_ratio: torch.Tensor, mask: torch.Tensor, mode: str, cap: float = 2.0,
                       band: tuple[float, float] = (0.5, 2.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [B, L] that correct the update for the sampler/trainer mismatch, and which tokens the
    correction truncated or masked (bool [B, L]); both zero outside `mask` (the thought tokens).

    `log_ratio` = trainer old log-prob - sampler (behaviour) log-prob per token.
    token_tis: min(exp(log_ratio), cap) per token (truncated importance sampling).
    seq_tis: min(exp(sum of the thought's log_ratio), cap) for all its tokens.
    token_mask: 1, or 0 for a token whose ratio leaves `band` (icepop-style).
    seq_mask: 1, or 0 for every token of a thought whose geometric-mean ratio leaves `band`.
    none: 1 everywhere on the mask."""
    log_ratio = log_ratio.masked_fill(~mask, 0.0)
    on = mask.to(log_ratio.dtype)
    lo, hi = math.log(band[0]), math.log(band[1])
    if mode == "none":
        return on, torch.zeros_like(mask)
    if mode == "token_tis":
        return log_ratio.clamp(max=math.log(cap)).exp() * on, (log_ratio > math.log(cap)) & mask
    if mode == "token_mask":
        out = ((log_ratio < lo) | (log_ratio > hi)) & mask
        return on * ~out, out
    per_thought = log_ratio.sum(-1, keepdim=True)
    if mode == "seq_tis":
        return per_thought.clamp(max=math.log(cap)).exp() * on, (per_thought > math.log(cap)) & mask
    if mode == "seq_mask":
        geo = per_thought / mask.sum(-1, keepdim=True).clamp(min=1)
        out = ((geo < lo) | (geo > hi)) & mask
        return on * ~out, out
    raise ValueError(f"unknown mismatch correction {mode!r}")


def mismatch_stats(trainer_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """How far the sampler's distribution is from the trainer's on the sampled thought tokens: mean
    and max |log ratio|, and the k3 estimate of KL(sampler || trainer) from the sampler's own samples,
    mean over tokens of r - 1 - log r with r = p_trainer / p_sampler."""
    delta = (trainer_logp - behaviour_logp)[mask].double()
    if delta.numel() == 0:
        return {}
    return {"mean_abs_log_ratio": delta.abs().mean().item(), "max_abs_log_ratio": delta.abs().max().item(),
            "kl_k3": (delta.exp() - 1 - delta).mean().item()}
