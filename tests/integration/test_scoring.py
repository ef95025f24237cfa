"""The fused scorer against independent teacher-forced computations (unpadded, float64)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from rntp.forward.scoring import next_token_entropy, score_groups
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


def make_groups():
    """Three positions with 2, 3 and 1 thoughts: closed, unclosed (appended close), and empty."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(100, 40000, (n,), generator=gen).tolist()  # noqa: E731
    contexts, targets = [rand(9), rand(14), rand(5)], [rand(4), rand(4), rand(4)]
    open_ids = [44, 17400, 46]
    rollouts = []
    for group, sampled, closed in [(0, 5, True), (0, 3, False), (1, 8, True), (1, 1, False), (1, 0, False),
                                   (2, 6, True)]:
        thought = rand(sampled) + ([90, 91] if not closed else [])
        rollouts.append(Rollout(group, contexts[group] + open_ids, thought, n_sampled=sampled, closed=closed))
    return contexts, rollouts, targets


@pytest.mark.parametrize("micro_batch", [1, 3, 16])
def test_fused_scores_equal_independent_teacher_forcing(model, micro_batch):
    contexts, rollouts, targets = make_groups()
    scored = score_groups(model, contexts, rollouts, targets, pad_id=0, micro_batch=micro_batch)
    no_think = scored.no_think_logprobs
    for i, r in enumerate(rollouts):
        t = targets[r.group]
        ref = reference_logprobs(model, r.prompt_ids + r.thought_ids + t)
        want_target = ref[-len(t):]
        start = len(r.prompt_ids) - 1
        want_thought = ref[start : start + r.n_sampled]
        assert scored.target_logprobs[i].tolist() == pytest.approx(want_target, abs=2e-4)
        got_thought = scored.thought_logprobs[i][scored.batch.thought_mask[i]].tolist()
        assert got_thought == pytest.approx(want_thought, abs=2e-4)
        # The default reward is the sum of the target log-probs, compared with the reference sum.
        assert float(scored.target_logprobs[i].sum()) == pytest.approx(sum(want_target), abs=1e-3)
        # Greedy hits against an independent argmax.
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([r.prompt_ids + r.thought_ids + t])).logits[0]
        want_greedy = (logits[-len(t) - 1 : -1].argmax(-1) == torch.tensor(t)).tolist()
        assert scored.target_greedy[i].tolist() == want_greedy
    for g, (ctx, t) in enumerate(zip(contexts, targets)):
        assert no_think[g].tolist() == pytest.approx(reference_logprobs(model, ctx + t)[-len(t):], abs=2e-4)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + t])).logits[0]
        assert scored.no_think_greedy[g].tolist() == (logits[-len(t) - 1 : -1].argmax(-1) == torch.tensor(t)).tolist()


def test_next_token_entropy_against_softmax_by_hand(model):
    contexts = [[300, 301, 302], [400, 401, 402, 403, 404], [500]]
    got = next_token_entropy(model, contexts, pad_id=0, micro_batch=2)
    for row, ctx in zip(got, contexts):
        with torch.no_grad():
            p = torch.softmax(model(input_ids=torch.tensor([ctx])).logits[0, -1].double(), -1)
        assert float(row) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-4)


def nucleus_logprob(logits_row, token, temperature, top_p):
    """float64, by hand: tokens in order of probability, kept while the mass before them is < top_p."""
    probs = torch.softmax(logits_row.double() / temperature, -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, above = set(), 0.0
    for i in order:
        if above >= top_p:
            break
        kept.add(i)
        above += probs[i]
    if token not in kept:
        return float("-inf")
    return float(torch.log(torch.tensor(probs[token], dtype=torch.float64) / sum(probs[i] for i in kept)))


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.5, 0.9), (0.5, 0.5)])
def test_thought_logprobs_follow_the_sampling_distribution(temperature, top_p, model):
    """Scoring (old log-probs) and the update's forward (new log-probs) give thought tokens the
    log-probs of the distribution sampled from, the same in both, and target tokens the model's own."""
    from rntp.forward.packing import LOGP_FLOOR, build_packs, packed_logprobs

    contexts, rollouts, targets = make_groups()
    scored = score_groups(model, contexts, rollouts, targets, pad_id=0, micro_batch=16, temperature=temperature,
                          top_p=top_p)
    plain = score_groups(model, contexts, rollouts, targets, pad_id=0, micro_batch=16)
    torch.testing.assert_close(scored.target_logprobs, plain.target_logprobs)  # the reward is untouched
    for i, r in enumerate(rollouts):
        seq = r.prompt_ids + r.thought_ids + targets[r.group]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0]
        first = len(r.prompt_ids)
        expected = [max(nucleus_logprob(logits[t - 1], seq[t], temperature, top_p), LOGP_FLOOR)
                    for t in range(first, first + r.n_sampled)]
        got = scored.thought_logprobs[i][scored.batch.thought_mask[i]].double()
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=2e-4)
    with torch.no_grad():  # the update's forward: the same packs, without extras
        for _, pack in build_packs(contexts, rollouts, targets, micro_batch=2):
            new = packed_logprobs(model, pack, temperature=temperature, top_p=top_p).logp
            for i, span in pack.thoughts.items():
                torch.testing.assert_close(new[span], scored.thought_logprobs[i][scored.batch.thought_mask[i]],
                                           rtol=0, atol=2e-4)
            for i, span in pack.targets.items():
                torch.testing.assert_close(new[span], plain.target_logprobs[i], rtol=0, atol=2e-4)


def test_a_baseline_model_no_think_scores_equal_scorings(model):
    """`no_think_logprobs` (initial model, EMA teacher) and `score_groups` read the same packs."""
    from rntp.forward.scoring import no_think_logprobs

    contexts, rollouts, targets = make_groups()
    scored = score_groups(model, contexts, rollouts, targets, pad_id=0, micro_batch=4)
    for micro_batch in (1, 3):
        torch.testing.assert_close(no_think_logprobs(model, contexts, targets, micro_batch=micro_batch),
                                   scored.no_think_logprobs, rtol=0, atol=1e-5)
    for g, (c, t) in enumerate(zip(contexts, targets)):
        torch.testing.assert_close(scored.no_think_logprobs[g].double(),
                                   torch.tensor(reference_logprobs(model, c + t)[len(c) - 1:], dtype=torch.float64),
                                   rtol=0, atol=1e-4)
