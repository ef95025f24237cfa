"""Learning is tested, not assumed: the real loop must raise a reward that depends only on the
thought tokens. A flipped policy-gradient sign lowers it; a mask that misses the thought tokens
leaves it flat (context and target are fixed within a group, so they cannot raise it).

The reward is the fraction of thought tokens in the upper half of the vocabulary. A random model
has no direction for "upper half", so the fixture gives it one: every input embedding carries a
constant feature, the LM head reads it as +1 for upper-half ids and -1 for the rest, and the final
norm weight of that feature starts at 0, so the model starts at P(upper) = 1/2 and can learn it.
"""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rewards import REWARDS, register_reward
from rntp.train import train

pytestmark = pytest.mark.integration

HALF = 49152 // 2

if "test_upper_ids" not in REWARDS:
    @register_reward("test_upper_ids", "r = fraction of thought tokens with id >= V/2 (test only)")
    def upper_ids(x):
        return torch.tensor([sum(t >= HALF for t in ids) / max(len(ids), 1) for ids in x.thought_ids])


def one_layer_llama(tokenizer) -> LlamaForCausalLM:
    """A random 1-layer Llama (width 64, untied head) over `tokenizer`, seeded, for the fixtures to shape."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                                        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id))


@pytest.fixture(scope="module")
def learnable_model_dir(tmp_path_factory, tokenizer):
    model = one_layer_llama(tokenizer)
    config = model.config
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        sign = torch.where(torch.arange(config.vocab_size) >= HALF, 1.0, -1.0)
        model.lm_head.weight[:, 0] = sign
        model.model.norm.weight[0] = 0.0
    out = tmp_path_factory.mktemp("learnable")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def rewards(run_dir):
    return [json.loads(line)["reward/mean"] for line in open(run_dir / "metrics.jsonl")]


def test_policy_learns_to_raise_the_reward(tiny_config, learnable_model_dir, tmp_path):
    cfg = tiny_config(f"model.name_or_path={learnable_model_dir}", "reward.name=test_upper_ids", "train.steps=12",
                      "optim.lr=2e-2", "rollout.group_size=8", "train.positions_per_step=4", "train.micro_batch=32",
                      "rollout.max_thought_tokens=8", f"run_dir={tmp_path / 'learn'}")
    train(cfg)
    r = rewards(tmp_path / "learn")
    start, end = sum(r[:3]) / 3, sum(r[-3:]) / 3
    assert 0.35 < start < 0.65, f"the model should start near 1/2, got {start:.3f}"
    assert end > start + 0.2, f"reward did not rise: {r}"
