"""Shared-prefix packs against independent, unpacked sequences (float64, tiny model): the same
log-probs and the same gradients, with several positions per chunk and truncated thoughts."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from rntp.forward.packing import build_packs, packed_logprobs
from rollout import Rollout

pytestmark = pytest.mark.integration
OPEN = [44, 17400, 46]


def exact_rope(model):
    """A float64 model that stays float64: transformers computes rotary angles with a float32 matmul
    (whose last bit can depend on the column a position sits in) and RMSNorm in float32, which turns
    float64 rounding noise (a dot product summed in another order at another index of a packed row)
    into ~1e-7 differences that are not packing's. Both are replaced by float64 equivalents."""
    rope = model.model.rotary_emb
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = (lambda m: lambda h: m.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True)
                                                                              + m.variance_epsilon))(module)

    def forward(x, position_ids):
        freqs = position_ids[..., None].double() * rope.inv_freq.double()
        angles = torch.cat((freqs, freqs), -1)
        return (angles.cos() * rope.attention_scaling).to(x.dtype), (angles.sin() * rope.attention_scaling).to(x.dtype)

    rope.forward = forward
    return model


def load64(model_dir):
    return exact_rope(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64))


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    return load64(tiny_model_dir).eval()


def chunk_positions():
    """Two chunks: the first with three positions (nested contexts), the second with one; 1-3
    thoughts each, closed, truncated (close appended) and empty."""
    gen = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(100, 40000, (n,), generator=gen).tolist()  # noqa: E731
    chunk_a, chunk_b = rand(40), rand(30)
    places = [(chunk_a, 8), (chunk_a, 15), (chunk_a, 27), (chunk_b, 12)]
    H = 4
    contexts = [c[:p] for c, p in places]
    targets = [c[p : p + H] for c, p in places]
    rollouts = []
    for group, sampled, closed in [(0, 5, True), (0, 3, False), (1, 2, True), (1, 0, False), (1, 6, True),
                                   (2, 4, False), (3, 1, True), (3, 7, False)]:
        thought = rand(sampled) + ([90, 91] if not closed else [])
        rollouts.append(Rollout(group, contexts[group] + OPEN, thought, n_sampled=sampled, closed=closed))
    return contexts, rollouts, targets


def reference(model, seq, start, count):
    """log p(seq[t] | seq[:t]) for t in [start, start + count), one unpadded forward."""
    logits = model(input_ids=torch.tensor([seq])).logits[0]
    logp = torch.log_softmax(logits, -1)
    return torch.stack([logp[t - 1, seq[t]] for t in range(start, start + count)]) if count else logp[:0, 0]


def read(result, pack, where):
    return {key: result.logp[s] for key, s in where(pack).items()}


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("micro_batch", [1, 2, 4, 8])  # 1 and 2 split groups of 3 over packs
@pytest.mark.parametrize("attention", ["blocks", "dense"])
def test_packed_logprobs_equal_independent_sequences(shared, micro_batch, attention, model64):
    contexts, rollouts, targets = chunk_positions()
    thoughts, target_lp, no_think = {}, {}, {}
    with torch.no_grad():
        for _, pack in build_packs(contexts, rollouts, targets, micro_batch=micro_batch, shared=shared,
                                   no_think=True):
            out = packed_logprobs(model64, pack, attention=attention)
            thoughts.update(read(out, pack, lambda p: p.thoughts))
            target_lp.update(read(out, pack, lambda p: p.targets))
            no_think.update(read(out, pack, lambda p: p.no_think))
        for i, r in enumerate(rollouts):
            seq = r.prompt_ids + r.thought_ids + targets[r.group]
            torch.testing.assert_close(thoughts[i], reference(model64, seq, len(r.prompt_ids), r.n_sampled),
                                       rtol=0, atol=1e-10)
            torch.testing.assert_close(target_lp[i], reference(model64, seq, len(seq) - 4, 4), rtol=0, atol=1e-10)
        for g, (c, t) in enumerate(zip(contexts, targets)):
            torch.testing.assert_close(no_think[g], reference(model64, c + t, len(c), 4), rtol=0, atol=1e-10)


def test_one_trunk_per_chunk_when_shared():
    contexts, rollouts, targets = chunk_positions()
    (_, shared), = build_packs(contexts, rollouts, targets, micro_batch=8, no_think=True)
    (_, unshared), = build_packs(contexts, rollouts, targets, micro_batch=8, shared=False, no_think=True)
    branches = sum(len(r.prompt_ids) - len(contexts[r.group]) + len(r.thought_ids) + 4 for r in rollouts)
    assert shared.tokens == (27 + 4) + (12 + 4) + branches  # each chunk's tokens once
    assert unshared.tokens == sum(len(c) + 4 for c in contexts) + sum(len(contexts[r.group]) for r in rollouts) \
        + branches
    assert len(shared.rows) == 2 and len(unshared.rows) == len(contexts) + len(rollouts)


def loss_of(values: dict, weights: dict) -> torch.Tensor:
    return sum((values[k] * weights[k][: len(values[k])]).sum() for k in values)


@pytest.mark.parametrize("micro_batch", [1, 2, 8])
def test_shared_gradients_equal_unshared_and_independent(micro_batch, tiny_model_dir):
    """The gradient through a shared context is the sum over its branches, exactly: shared packs,
    unshared packs and unpacked sequences give the same gradient (float64, 1e-9 relative)."""
    contexts, rollouts, targets = chunk_positions()
    gen = torch.Generator().manual_seed(2)
    w_thought = {i: torch.randn(8, generator=gen, dtype=torch.float64) for i in range(len(rollouts))}
    w_target = {i: torch.randn(4, generator=gen, dtype=torch.float64) for i in range(len(rollouts))}

    def grads(compute):
        model = load64(tiny_model_dir).train()
        compute(model).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def packed(shared):
        def compute(model):
            total = 0
            for _, pack in build_packs(contexts, rollouts, targets, micro_batch=micro_batch, shared=shared):
                out = packed_logprobs(model, pack, temperature=0.8, chunk=7)  # several head chunks
                total = total + loss_of(read(out, pack, lambda p: p.thoughts), w_thought) \
                    + loss_of(read(out, pack, lambda p: p.targets), w_target)
            return total
        return compute

    def independent(model):
        total = 0
        for i, r in enumerate(rollouts):
            seq = r.prompt_ids + r.thought_ids + targets[r.group]
            logits = model(input_ids=torch.tensor([seq])).logits[0]
            hot = torch.log_softmax(logits / 0.8, -1)
            plain = torch.log_softmax(logits, -1)
            start = len(r.prompt_ids)
            th = torch.stack([hot[t - 1, seq[t]] for t in range(start, start + r.n_sampled)]) if r.n_sampled else \
                hot[:0, 0]
            tg = torch.stack([plain[t - 1, seq[t]] for t in range(len(seq) - 4, len(seq))])
            total = total + (th * w_thought[i][: len(th)]).sum() + (tg * w_target[i]).sum()
        return total

    shared, unshared, ref = grads(packed(True)), grads(packed(False)), grads(independent)
    assert set(shared) == set(ref)
    for name, g in ref.items():
        scale = g.abs().max().clamp(min=1e-30)
        assert ((shared[name] - g).abs().max() / scale) < 1e-9, name
        assert ((unshared[name] - g).abs().max() / scale) < 1e-9, name


def test_positions_that_extend_a_shared_prefix_differently_get_their_own_trunks(model64):
    """b is a prefix of both a and c, which then differ (documents that open alike): a and c must not
    share one trunk, whatever order they come in."""
    gen = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(100, 40000, (n,), generator=gen).tolist()  # noqa: E731
    common = rand(10)
    a_doc, c_doc = common + rand(20), common + rand(20)
    places = [(common + rand(6), 6), (a_doc, 16), (c_doc, 18)]  # b's context + target lie inside `common`
    contexts = [doc[:p] for doc, p in places]
    targets = [doc[p : p + 4] for doc, p in places]
    rollouts = [Rollout(g, contexts[g] + OPEN, rand(3), n_sampled=3, closed=True) for g in range(3)]
    with torch.no_grad():
        for _, pack in build_packs(contexts, rollouts, targets, micro_batch=3, no_think=True):
            out = packed_logprobs(model64, pack)
            for i, span in pack.thoughts.items():
                r = rollouts[i]
                seq = r.prompt_ids + r.thought_ids + targets[r.group]
                torch.testing.assert_close(out.logp[span], reference(model64, seq, len(r.prompt_ids), 3),
                                           rtol=0, atol=1e-10)
            for g, span in pack.no_think.items():
                torch.testing.assert_close(out.logp[span], reference(model64, contexts[g] + targets[g],
                                                                     len(contexts[g]), 4), rtol=0, atol=1e-10)
    assert len(pack.rows) == 2  # b shares with a; c has its own trunk


def test_the_loops_pass_count_covers_every_pack():
    """Engines that fix the micro-passes per step (several ranks, DeepSpeed) run `packs_per_step`
    passes; a pack beyond them would be left out of the update. (The count once assumed thoughts fill
    micro-batches exactly: with G=4 and micro-batch 6, 3 positions made 3 packs but 2 passes.)"""
    from rntp.forward.packing import packs_per_step

    for positions in range(1, 7):
        for group in range(1, 6):
            for micro_batch in range(1, 13):
                contexts = [[100 + g] * 5 for g in range(positions)]  # no shared prefixes
                rollouts = [Rollout(g, contexts[g] + OPEN, [7], 1, True)
                            for g in range(positions) for _ in range(group)]
                packs = build_packs(contexts, rollouts, [[5, 6]] * positions, micro_batch=micro_batch)
                assert len(packs) == packs_per_step(positions, group, micro_batch)
                assert all(pack.thought_count <= micro_batch for _, pack in packs)
                assert sorted(i for held, _ in packs for i in held) == list(range(len(rollouts)))
