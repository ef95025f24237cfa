"""The update's forward passes on CPU under the conditions of GPU runs (bf16 autocast)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.integration.dist_worker import fixed_global_batch

pytestmark = pytest.mark.integration


def test_kl_reference_runs_under_the_policy_autocast(tiny_model_dir):
    """With the reference equal to the policy, the KL of the first pass is 0 only if both forwards
    run at the same precision (the reference once ran in fp32 beside a bf16-autocast policy)."""
    from rewards import score_groups
    from rntp import grpo
    from rntp.config import load_config
    from rntp.distributed import DistInfo, Engine
    from rntp.train import update_policy

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.autocast_bf16=true", "grpo.kl_coef=0.1",
                             "train.micro_batch=16", "rollout.group_size=4", "train.positions_per_step=4"])
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    contexts, rollouts, targets, rewards = fixed_global_batch(policy.config.vocab_size)
    scored = score_groups(policy.eval(), contexts, rollouts, targets, 0, 16, autocast=True)
    policy.train()
    advantages = grpo.group_advantages(rewards, torch.tensor([r.group for r in rollouts]), "group")
    engine = Engine(policy, cfg, DistInfo(), 1, total_steps=1)
    stats = update_policy(engine, ref, scored.batch, scored.thought_logprobs, advantages,
                          torch.ones(len(rollouts), dtype=torch.bool), cfg, None)
    assert stats["loss/kl"] == 0.0
