"""The fused scorer against independent teacher-forced computations (unpadded, float64)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from rewards import no_think_scores, score_rollouts
from rollout import Rollout

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def reference_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, one unpadded sequence, float64 log-softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]


def make_rollouts():
    gen = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(100, 40000, (n,), generator=gen).tolist()  # noqa: E731
    rollouts, targets = [], []
    for i, (ctx, th, closed) in enumerate([(9, 5, True), (14, 3, False), (6, 8, True), (11, 1, False), (5, 0, False)]):
        thought = rand(th) + ([90, 91] if not closed else [])
        rollouts.append(Rollout(i // 2, rand(ctx), thought, n_sampled=th, closed=closed))
        targets.append(rand(4))
    return rollouts, targets


@pytest.mark.parametrize("micro_batch", [1, 2, 8])
def test_reward_and_old_logprobs_equal_independent_teacher_forcing(model, micro_batch):
    rollouts, targets = make_rollouts()
    scored = score_rollouts(model, rollouts, targets, pad_id=0, micro_batch=micro_batch)
    for i, (r, t) in enumerate(zip(rollouts, targets)):
        ref = reference_logprobs(model, r.prompt_ids + r.thought_ids + t)
        want_target = ref[-len(t):]
        start = len(r.prompt_ids) - 1
        want_thought = ref[start : start + r.n_sampled]
        assert scored.target_logprobs[i].tolist() == pytest.approx(want_target, abs=2e-4)
        got_thought = scored.thought_logprobs[i][scored.batch.thought_mask[i]].tolist()
        assert got_thought == pytest.approx(want_thought, abs=2e-4)
        # The reward is the sum of the target log-probs, compared with the reference sum.
        assert float(scored.target_logprobs[i].sum()) == pytest.approx(sum(want_target), abs=1e-3)


def test_no_think_score_from_one_forward_per_chunk(model):
    gen = torch.Generator().manual_seed(1)
    chunks = [torch.randint(100, 40000, (30,), generator=gen).tolist() for _ in range(3)]
    positions = [(0, 5), (0, 20), (1, 12), (2, 26)]
    got = no_think_scores(model, chunks, positions, horizon=4, pad_id=0, micro_batch=2)
    for row, (c, p) in zip(got, positions):
        ref = reference_logprobs(model, chunks[c][: p + 4])
        assert row.tolist() == pytest.approx(ref[-4:], abs=2e-4)
