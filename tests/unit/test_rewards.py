"""Each reward against hand-worked values; property tests for finiteness and baseline invariance."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards import REWARDS, RewardInputs, apply_reward_config, compute_rewards, get_reward
from rewards.functions import byte_prefix_match, token_bytes_fn
from rntp import grpo
from rntp.config import RewardConfig

pytestmark = pytest.mark.unit

BUILTIN = ["target_logprob", "target_logprob_mean", "info_gain", "next_token_accuracy", "greedy_streak",
           "byte_prefix", "bleu", "chrf", "confidence", "vrcli"]


def inputs(target, logp, base, pred, thoughts=None, options=None, tokenizer=None):
    n = len(target)
    return RewardInputs(
        target_ids=torch.tensor(target), target_logprobs=torch.tensor(logp, dtype=torch.float32),
        no_think_logprobs=torch.tensor(base, dtype=torch.float32), target_pred=torch.tensor(pred),
        thought_ids=thoughts or [[1, 2]] * n, closed=torch.ones(n, dtype=torch.bool),
        group=torch.zeros(n, dtype=torch.long),
        token_bytes=token_bytes_fn(tokenizer) if tokenizer else (lambda i: str(i).encode()),
        decode=tokenizer.decode if tokenizer else (lambda ids: " ".join(map(str, ids))),
        options=options or RewardConfig())


def reward(name, x):
    return compute_rewards(name, x).tolist()


def test_likelihood_rewards_hand_worked():
    x = inputs([[5, 6, 7]], [[-1.0, -2.0, -0.5]], [[-2.0, -2.0, -2.0]], [[5, 9, 7]])
    assert reward("target_logprob", x) == pytest.approx([-3.5])
    assert reward("target_logprob_mean", x) == pytest.approx([-3.5 / 3])
    assert reward("info_gain", x) == pytest.approx([(-3.5 + 6.0) / 3])


def test_accuracy_streak_and_confidence_hand_worked():
    x = inputs([[5, 6, 7], [5, 6, 7]], [[-0.1, -2.0, -0.5], [-3.0, -1.0, -0.2]], [[0, 0, 0]] * 2,
               [[5, 6, 8], [9, 6, 7]], options=RewardConfig(k=2))
    assert reward("next_token_accuracy", x) == pytest.approx([1.0, 0.5])
    assert reward("greedy_streak", x) == pytest.approx([2.0, 0.0])  # the second misses its first token
    assert reward("confidence", x) == pytest.approx([(math.exp(-0.1) + math.exp(-2.0)) / 2, math.exp(-1.0) / 2])


def test_vrcli_steps_hand_worked():
    # improvement = 1 - exp((s0 - s)/H), H = 2
    opts = RewardConfig(vrcli_thresholds=[0.05, 0.1, 0.2], vrcli_values=[0.5, 0.9, 1.0])
    s0 = -4.0
    gains = [0.0, 0.07, 0.15, 0.5]  # wanted improvements
    s = [s0 - 2 * math.log(1 - g) for g in gains]
    x = inputs([[1, 2]] * 4, [[v / 2, v / 2] for v in s], [[s0 / 2, s0 / 2]] * 4, [[1, 2]] * 4, options=opts)
    assert reward("vrcli", x) == pytest.approx([0.0, 0.5, 0.9, 1.0])


def test_byte_prefix_hand_worked():
    truth = [b" the", b" cat", b"\xc3\xa9"]
    assert byte_prefix_match(b" the", truth) == 1.0
    assert byte_prefix_match(b" the cat", truth) == 1.0  # spans two true tokens, ends on a boundary
    assert byte_prefix_match(b" th", truth) == 0.0  # a prefix, but not on a boundary
    assert byte_prefix_match(b" the c", truth) == 0.0
    assert byte_prefix_match(b" dog", truth) == 0.0
    assert byte_prefix_match(b"", truth) == 0.0
    assert byte_prefix_match(b" the cat\xc3", truth) == 0.0  # half of a two-byte character


def test_byte_prefix_on_real_tokens_with_multibyte_characters(tokenizer):
    text = " café 東京 naïve"
    ids = tokenizer.encode(text, add_special_tokens=False)
    tb = token_bytes_fn(tokenizer)
    assert b"".join(tb(i) for i in ids) == text.encode("utf-8")
    straddling = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert straddling, "the fixture needs a token that holds part of a character"
    k = ids.index(straddling[0])
    target = ids[k : k + 3]
    x = inputs([target, target], [[0.0] * 3] * 2, [[0.0] * 3] * 2, [[target[0]] * 3, [ids[0]] * 3],
               tokenizer=tokenizer)
    assert reward("byte_prefix", x) == [1.0, 0.0]


def test_bleu_and_chrf_bounds_and_exact_match(tokenizer):
    target = tokenizer.encode(" the value returned by the function", add_special_tokens=False)
    wrong = tokenizer.encode(" zebra quantum umbrella fish kite", add_special_tokens=False)[: len(target)]
    wrong += wrong[:1] * (len(target) - len(wrong))
    x = inputs([target, target], [[0.0] * len(target)] * 2, [[0.0] * len(target)] * 2, [target, wrong],
               tokenizer=tokenizer)
    for name in ("bleu", "chrf"):
        right, bad = reward(name, x)
        assert right == pytest.approx(1.0) and 0.0 <= bad < 0.3


def test_modifiers_weighted_sum_length_penalty_and_clip():
    x = inputs([[5, 6]], [[-1.0, -1.0]], [[-2.0, -2.0]], [[5, 0]], thoughts=[[1, 2, 3]])
    cfg = RewardConfig(weights={"target_logprob": 1.0, "next_token_accuracy": 2.0}, length_penalty=0.1)
    assert apply_reward_config(cfg, x).tolist() == pytest.approx([-2.0 + 2.0 * 1.0 - 0.3])
    clipped = RewardConfig(name="target_logprob", clip_min=-1.5)
    assert apply_reward_config(clipped, x).tolist() == pytest.approx([-1.5])


def test_unknown_reward_lists_the_valid_ones():
    with pytest.raises(KeyError, match="registered rewards: .*byte_prefix.*target_logprob"):
        get_reward("no_such_reward")


def test_registry_has_every_builtin_with_a_formula():
    for name in BUILTIN:
        assert REWARDS[name].formula.strip()


@st.composite
def reward_batches(draw):
    n = draw(st.integers(1, 6))
    h = draw(st.integers(1, 5))  # 1-token targets included
    finite = st.floats(-60, 0, allow_nan=False)
    ids = st.integers(0, 49151)
    rows = lambda elem: [[draw(elem) for _ in range(h)] for _ in range(n)]  # noqa: E731
    thoughts = [[draw(ids) for _ in range(draw(st.integers(0, 4)))] for _ in range(n)]  # empty thoughts too
    return rows(ids), rows(finite), rows(finite), rows(ids), thoughts


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=reward_batches())
def test_every_builtin_reward_is_finite_for_any_input(batch, tokenizer):
    target, logp, base, pred, thoughts = batch
    x = inputs(target, logp, base, pred, thoughts=thoughts, tokenizer=tokenizer,
               options=RewardConfig(k=3, length_penalty=0.01))
    for name in BUILTIN:
        r = compute_rewards(name, x)
        assert r.shape == (len(target),) and torch.isfinite(r).all(), name


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(2, 8), st.sampled_from(["group", "batch", "none"]), st.integers(0, 2**31 - 1))
def test_a_per_position_baseline_leaves_group_advantages_unchanged(groups, size, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(groups * size, generator=gen, dtype=torch.float64) * 10
    group = torch.arange(groups).repeat_interleave(size)
    baseline = torch.randn(groups, generator=gen, dtype=torch.float64) * 50
    torch.testing.assert_close(grpo.group_advantages(rewards - baseline[group], group, scale),
                               grpo.group_advantages(rewards, group, scale), rtol=1e-7, atol=1e-7)
