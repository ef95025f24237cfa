"""Scorers (teacher-forced target log-probs) and reward functions, selected by name."""

from rewards.registry import (REWARDS, RewardFn, RewardInputs, apply_reward_config, compute_rewards, get_reward,
                              register_reward, reward_names)
from rewards.scoring import (Scored, SequenceBatch, build_batch, next_token_entropy, no_think_logprobs,
                             position_entropies, score_groups, token_logprobs)
from rewards import functions as _functions  # noqa: F401  (registers the built-in rewards)

__all__ = [
    "REWARDS", "RewardFn", "RewardInputs", "apply_reward_config", "compute_rewards", "get_reward", "register_reward",
    "reward_names", "no_think_logprobs", "position_entropies",
    "Scored", "SequenceBatch", "build_batch", "next_token_entropy", "score_groups", "token_logprobs",
]
