"""Gradient check: the policy loss reaches only the sampled thought tokens."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from rntp.forward.scoring import build_batch, token_logprobs
from rntp import grpo
from rollout import Rollout

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["seq_mean", "token_mean", "token_sum"])
def test_context_and_target_get_no_policy_gradient(tiny_model_dir, mode):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rollouts = [Rollout(0, [300, 301, 302, 303], [400, 401, 402], 3, True),
                Rollout(0, [310, 311], [410, 90, 91], 1, False)]
    batch = build_batch(rollouts, [[500, 501], [510, 511]], pad_id=0)
    logp, logits = token_logprobs(model, batch.input_ids, batch.attention_mask, with_logits=True)
    logits.retain_grad()
    # Off-policy old log-probs, so the gradient is not trivially symmetric.
    loss_tok, _ = grpo.clipped_surrogate(logp, logp.detach() - 0.05, torch.tensor([1.0, -0.7]), 0.2, 0.28)
    grpo.aggregate(loss_tok, batch.thought_mask.float(), grpo.LossNorm.of(mode, batch.thought_mask, 4)).backward()
    grad_rows = logits.grad.abs().sum(-1)  # [B, L-1], gradient reaching each predicted position
    assert (grad_rows[batch.thought_mask] > 0).all()
    assert (grad_rows[~batch.thought_mask] == 0).all()
    # Explicitly, by token: only 400-402 and 410 are trained; context, appended close, target are not.
    predicted = batch.input_ids[:, 1:]
    trained = sorted(predicted[grad_rows > 0].tolist())
    assert trained == [400, 401, 402, 410]


def test_tail_logits_equal_full_logits(tiny_model_dir):
    """Computing logits only for the thought/target tail changes no value."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rollouts = [Rollout(0, list(range(300, 320)), [400, 401], 2, True), Rollout(0, [310, 311], [410], 1, True)]
    batch = build_batch(rollouts, [[500, 501], [510, 511]], pad_id=0)
    full = token_logprobs(model, batch.input_ids, batch.attention_mask)
    tail = token_logprobs(model, batch.input_ids, batch.attention_mask, tail=batch.tail)
    assert batch.tail == 4  # the longest thought + target: 2 + 2
    torch.testing.assert_close(tail, full[:, -batch.tail:])
