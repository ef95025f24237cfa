"""Learning is tested, not assumed: the real loop must raise a dense reward that depends only on
the thought tokens. A flipped policy-gradient sign lowers it; a wrong mask leaves it flat."""

import json

import pytest
import torch

from rewards import REWARDS, register_reward
from rntp.train import train

pytestmark = pytest.mark.integration

HALF = 49152 // 2

if "test_low_ids" not in REWARDS:
    @register_reward("test_low_ids", "r = fraction of thought tokens with id < V/2 (test only)")
    def low_ids(x):
        return torch.tensor([sum(t < HALF for t in ids) / max(len(ids), 1) for ids in x.thought_ids])


def rewards(run_dir):
    return [json.loads(line)["reward/mean"] for line in open(run_dir / "metrics.jsonl")]


def test_policy_learns_to_raise_the_reward(tiny_config, tmp_path):
    cfg = tiny_config("reward.name=test_low_ids", "train.steps=25", "optim.lr=3e-3",
                      "rollout.group_size=8", "train.positions_per_step=4", "train.micro_batch=32",
                      "rollout.max_thought_tokens=8", f"run_dir={tmp_path / 'learn'}")
    train(cfg)
    r = rewards(tmp_path / "learn")
    start, end = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert 0.35 < start < 0.65  # a random model emits low and high ids alike
    assert end > start + 0.25, f"reward did not rise: {start:.3f} -> {end:.3f}"
