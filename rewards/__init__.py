"""Reward functions, in a registry selected by name. Scoring (the teacher-forced log-probs they are
computed from, which also feed the loss) lives in `rntp/forward/scoring.py`."""

from rewards.registry import (REWARDS, RewardFn, RewardInputs, apply_reward_config, compute_rewards, get_reward,
                              register_reward, reward_names)
from rewards import functions as _functions  # noqa: F401  (registers the built-in rewards)

__all__ = [
    "REWARDS", "RewardFn", "RewardInputs", "apply_reward_config", "compute_rewards", "get_reward", "register_reward",
    "reward_names",
]
