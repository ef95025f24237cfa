"""GRPO maths against independent float64 loop computations and hand-worked numbers."""

import math

import pytest
import torch

from rntp import grpo

pytestmark = pytest.mark.unit


def loop_advantages(rewards, groups, scale, eps=1e-6):
    rewards = [float(r) for r in rewards]
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(int(g), []).append(i)
    centred = [0.0] * len(rewards)
    out = [0.0] * len(rewards)
    for idx in members.values():
        m = sum(rewards[i] for i in idx) / len(idx)
        var = sum((rewards[i] - m) ** 2 for i in idx) / max(len(idx) - 1, 1)
        for i in idx:
            centred[i] = rewards[i] - m
            out[i] = centred[i] / (math.sqrt(var) + eps)
    if scale == "group":
        return out
    if scale == "none":
        return centred
    mu = sum(centred) / len(centred)
    sd = math.sqrt(sum((c - mu) ** 2 for c in centred) / (len(centred) - 1))
    return [c / (sd + eps) for c in centred]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_loop_reference(scale):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(24, generator=gen, dtype=torch.float64) * 5 - 30
    groups = torch.arange(6).repeat_interleave(4)
    got = grpo.group_advantages(rewards, groups, scale)
    want = torch.tensor(loop_advantages(rewards, groups, scale), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_advantages_hand_worked():
    # group {1, 3}: mean 2, unbiased std sqrt(2); group {5, 5}: no spread
    got = grpo.group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0], dtype=torch.float64), torch.tensor([0, 0, 1, 1]))
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(got, torch.tensor([-s, s, 0.0, 0.0], dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_per_position_baseline_cancels(scale):
    """A baseline that is constant within a group (like the no-think score) changes nothing."""
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(20, generator=gen, dtype=torch.float64)
    groups = torch.arange(5).repeat_interleave(4)
    baseline = torch.randn(5, generator=gen, dtype=torch.float64) * 100
    torch.testing.assert_close(grpo.group_advantages(rewards - baseline[groups], groups, scale),
                               grpo.group_advantages(rewards, groups, scale), rtol=1e-9, atol=1e-9)


def test_clipped_surrogate_hand_worked():
    # ratios e^{0.5}=1.6487 and e^{-0.5}=0.6065; eps_low 0.2, eps_high 0.28
    logp = torch.tensor([[0.5, -0.5], [0.5, -0.5]], dtype=torch.float64)
    old = torch.zeros_like(logp)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, clipped = grpo.clipped_surrogate(logp, old, adv, 0.2, 0.28)
    r_hi, r_lo = math.exp(0.5), math.exp(-0.5)
    # A>0: -min(r, clip(r)) -> high ratio clipped to 1.28; low ratio unclipped (0.6065 < 0.8 is pessimistic).
    # A<0: -min(-r, -clip(r)) = max(r, clip(r)) -> high ratio unclipped; low ratio clipped to 0.8.
    want = torch.tensor([[-1.28, -r_lo], [r_hi, 0.8]], dtype=torch.float64)
    torch.testing.assert_close(loss, want)
    assert clipped.tolist() == [[True, False], [False, True]]


def loop_aggregate(values, mask, mode, max_tokens):
    seqs = len(values)
    total = sum(sum(m) for m in mask)
    if mode == "seq_mean":
        return sum(sum(v * m for v, m in zip(vr, mr)) / max(sum(mr), 1) for vr, mr in zip(values, mask)) / seqs
    s = sum(v * m for vr, mr in zip(values, mask) for v, m in zip(vr, mr))
    return s / total if mode == "token_mean" else s / (seqs * max_tokens)


@pytest.mark.parametrize("mode", ["seq_mean", "token_mean", "token_sum"])
@pytest.mark.parametrize("micro", [1, 3, 10])
def test_micro_batches_add_up_to_batch_loss(mode, micro):
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(10, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(10, 7, generator=gen) > 0.4
    mask[:, 0] = True
    norm = grpo.LossNorm.of(mode, mask, max_tokens=7)
    total = sum(grpo.aggregate(values[s : s + micro], mask[s : s + micro].double(), norm)
                for s in range(0, 10, micro))
    want = loop_aggregate(values.tolist(), mask.int().tolist(), mode, 7)
    assert abs(float(total) - want) < 1e-12


def test_aggregation_modes_differ_on_unequal_lengths():
    values = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    got = {m: float(grpo.aggregate(values, mask, grpo.LossNorm.of(m, mask, 4))) for m in
           ("seq_mean", "token_mean", "token_sum")}
    assert got == pytest.approx({"seq_mean": 2.5, "token_mean": 7 / 4, "token_sum": 7 / 8})


def test_k3_kl_worked_value_and_nonnegative():
    p = torch.tensor([-1.0, -2.0, -0.1], dtype=torch.float64)
    q = torch.tensor([-1.5, -2.0, -3.0], dtype=torch.float64)
    got = grpo.k3_kl(p, q)
    want = torch.tensor([math.exp(-0.5) + 0.5 - 1, 0.0, math.exp(-2.9) + 2.9 - 1], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    assert (grpo.k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_nonfinite_reward_drops_whole_group():
    rewards = torch.tensor([1.0, 2.0, float("nan"), 3.0, 4.0, float("inf")])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert grpo.finite_groups(rewards, groups).tolist() == [True, True, False, False, False, False]


def test_zero_spread_fraction():
    rewards = torch.tensor([1.0, 1.0, 2.0, 3.0, 5.0, 5.0])
    assert grpo.zero_spread_fraction(rewards, torch.tensor([0, 0, 1, 1, 2, 2])) == pytest.approx(2 / 3)


def test_pooled_std_equals_the_unbiased_std_of_the_pieces():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(13, generator=gen, dtype=torch.float64) * 4 + 2
    parts = [x[:5], x[5:9], x[9:]]  # as three ranks would hold them
    n, total, squares = (sum(f(p) for p in parts) for f in (len, lambda p: float(p.sum()),
                                                            lambda p: float((p**2).sum())))
    assert grpo.pooled_std(n, total, squares) == pytest.approx(float(x.std()), rel=1e-12)
    assert grpo.pooled_std(1, 3.0, 9.0) == 0.0


def reference_weights(log_ratio, mask, mode, cap, band):
    """float64 loops over thoughts and tokens: the correction as the config describes it."""
    out, flagged = [], []
    for row, m in zip(log_ratio.double().tolist(), mask.tolist()):
        kept = [x for x, on in zip(row, m) if on]
        product = math.exp(sum(kept))
        geo = math.exp(sum(kept) / max(len(kept), 1))
        w_row, f_row = [], []
        for x, on in zip(row, m):
            if not on:
                w_row.append(0.0)
                f_row.append(False)
            elif mode == "token_tis":
                w_row.append(min(math.exp(x), cap))
                f_row.append(math.exp(x) > cap)
            elif mode == "seq_tis":
                w_row.append(min(product, cap))
                f_row.append(product > cap)
            elif mode == "token_mask":
                inside = band[0] <= math.exp(x) <= band[1]
                w_row.append(1.0 if inside else 0.0)
                f_row.append(not inside)
            elif mode == "seq_mask":
                inside = band[0] <= geo <= band[1]
                w_row.append(1.0 if inside else 0.0)
                f_row.append(not inside)
            else:
                w_row.append(1.0)
                f_row.append(False)
        out.append(w_row)
        flagged.append(f_row)
    return torch.tensor(out, dtype=torch.float64), torch.tensor(flagged)


@pytest.mark.parametrize("mode", ["none", "token_tis", "seq_tis", "token_mask", "seq_mask"])
def test_importance_weights_match_a_float64_loop(mode):
    gen = torch.Generator().manual_seed(3)
    offset = torch.tensor([-1.0, -0.3, 0.0, 0.1, 0.9, 0.0], dtype=torch.float64)[:, None]  # whole thoughts off
    log_ratio = torch.randn(6, 9, generator=gen, dtype=torch.float64) * 0.4 + offset
    mask = torch.rand(6, 9, generator=gen) > 0.3
    mask[5] = False  # a thought with no sampled token
    weights, flagged = grpo.importance_weights(log_ratio, mask, mode, cap=1.5, band=(0.6, 1.8))
    ref_w, ref_f = reference_weights(log_ratio, mask, mode, 1.5, (0.6, 1.8))
    torch.testing.assert_close(weights, ref_w, rtol=1e-12, atol=1e-12)
    assert torch.equal(flagged, ref_f)
    if mode != "none":
        assert flagged.any() and (~flagged & mask).any()  # the band and cap bite here, and not everywhere


def test_importance_weights_worked_numbers():
    log_ratio = torch.tensor([[math.log(3.0), math.log(0.5), 0.0]])
    mask = torch.tensor([[True, True, False]])
    w, _ = grpo.importance_weights(log_ratio, mask, "token_tis", cap=2.0)
    assert w.tolist() == [[2.0, 0.5, 0.0]]
    w, _ = grpo.importance_weights(log_ratio, mask, "seq_tis", cap=2.0)  # product 1.5
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.5, 0.0]]))
    w, f = grpo.importance_weights(log_ratio, mask, "token_mask", band=(0.6, 2.5))
    assert w.tolist() == [[0.0, 0.0, 0.0]] and f.tolist() == [[True, True, False]]
    w, _ = grpo.importance_weights(log_ratio, mask, "seq_mask", band=(0.6, 2.5))  # geometric mean 1.22
    assert w.tolist() == [[1.0, 1.0, 0.0]]


def test_mismatch_stats_against_a_loop():
    gen = torch.Generator().manual_seed(4)
    trainer, behaviour = -torch.rand(3, 5, generator=gen) * 3, -torch.rand(3, 5, generator=gen) * 3
    mask = torch.rand(3, 5, generator=gen) > 0.4
    stats = grpo.mismatch_stats(trainer, behaviour, mask)
    deltas = [t - b for tr, br, mr in zip(trainer.tolist(), behaviour.tolist(), mask.tolist())
              for t, b, m in zip(tr, br, mr) if m]
    assert stats["mean_abs_log_ratio"] == pytest.approx(sum(abs(d) for d in deltas) / len(deltas), rel=1e-6)
    assert stats["max_abs_log_ratio"] == pytest.approx(max(abs(d) for d in deltas), rel=1e-6)
    assert stats["kl_k3"] == pytest.approx(sum(math.exp(d) - 1 - d for d in deltas) / len(deltas), rel=1e-6)
    assert stats["kl_k3"] > 0
    assert grpo.mismatch_stats(trainer, trainer, mask)["kl_k3"] == 0.0


def loop_batch_advantages(rewards, groups, *, scale, min_group_std=0.0, drop_negative=False, eps=1e-6):
    """The loop's whole advantage step written with lists: drop groups with a non-finite reward,
    then groups whose unbiased std is at most min_group_std, then scale the kept ones."""
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(int(g), []).append(i)
    kept_groups, nonfinite, low = [], 0, 0
    for g, idx in members.items():
        values = [float(rewards[i]) for i in idx]
        if not all(math.isfinite(v) for v in values):
            nonfinite += 1
            continue
        m = sum(values) / len(values)
        sd = math.sqrt(sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1))
        if min_group_std > 0 and not sd > min_group_std:
            low += 1
            continue
        kept_groups.append(g)
    keep = [int(groups[i]) in kept_groups for i in range(len(rewards))]
    out = [0.0] * len(rewards)
    kept = [i for i in range(len(rewards)) if keep[i]]
    if kept:
        sub = loop_advantages([rewards[i] for i in kept], [kept_groups.index(int(groups[i])) for i in kept], scale, eps)
        for i, a in zip(kept, sub):
            out[i] = max(a, 0.0) if drop_negative else a
    return out, keep, nonfinite, low


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("min_group_std", [0.0, 0.5])
@pytest.mark.parametrize("drop_negative", [False, True])
def test_batch_advantages_match_loop_reference(scale, min_group_std, drop_negative):
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    rewards[1, 2] = float("nan")  # dropped whole
    rewards[3] = 0.1 * rewards[3]  # too little spread for min_group_std=0.5
    rewards[5, 0] = float("inf")
    rewards = rewards.flatten()
    groups = torch.arange(8).repeat_interleave(4)
    got = grpo.advantages(rewards, groups, scale=scale, min_group_std=min_group_std, drop_negative=drop_negative)
    want, keep, nonfinite, low = loop_batch_advantages(rewards.tolist(), groups.tolist(), scale=scale,
                                                       min_group_std=min_group_std, drop_negative=drop_negative)
    assert got.keep.tolist() == keep
    assert (got.dropped_nonfinite, got.dropped_low_spread) == (nonfinite, low)
    assert nonfinite == 2 and (low >= 1 if min_group_std else low == 0)
    torch.testing.assert_close(got.values, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_batch_scale_over_ranks_equals_one_process():
    """Two ranks' batch-scaled advantages, reduced through a shared sum, equal the advantages of
    their union in one process; a rank that kept nothing still takes part in the reduction."""
    gen = torch.Generator().manual_seed(2)
    rewards = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    rewards[4, 1] = float("nan")  # rank 1 holds groups 4 and 5 and drops both
    rewards[5, 3] = float("nan")
    whole = grpo.advantages(rewards.flatten(), torch.arange(6).repeat_interleave(4), scale="batch")
    stats = []
    for part in (rewards[:4], rewards[4:]):  # first pass: record each rank's (n, sum, sum of squares)
        grpo.advantages(part.flatten(), torch.arange(len(part)).repeat_interleave(4), scale="batch",
                        reduce=lambda v: stats.append(v) or v)
    total = [sum(col) for col in zip(*stats)]
    ranks = [grpo.advantages(part.flatten(), torch.arange(len(part)).repeat_interleave(4), scale="batch",
                             reduce=lambda v: total) for part in (rewards[:4], rewards[4:])]
    assert len(stats) == 2 and stats[1] == [0.0, 0.0, 0.0]
    torch.testing.assert_close(torch.cat([r.values for r in ranks]), whole.values)
    assert sum(r.dropped_nonfinite for r in ranks) == whole.dropped_nonfinite == 2


def test_group_advantages_batch_goes_through_reduce():
    rewards = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    seen = []
    got = grpo.group_advantages(rewards, groups, "batch", reduce=lambda v: seen.append(v) or v)
    torch.testing.assert_close(got, torch.tensor(loop_advantages(rewards.tolist(), groups.tolist(), "batch"),
                                                 dtype=torch.float64))
    assert seen == [[4.0, 0.0, pytest.approx(0.25 + 0.25 + 4.0 + 4.0)]]  # centred: -0.5, 0.5, -2, 2


def test_zero_spread_fraction_counts_only_groups_that_have_rows():
    # Dropped groups leave holes in the ids (`group[keep]`): one group, with spread, at id 1.
    assert grpo.zero_spread_fraction(torch.tensor([0.0, 1.0]), torch.tensor([1, 1])) == 0.0
    # ids 0, 2 and 4: one of the three groups present has no spread
    rewards = torch.tensor([1.0, 1.0, 2.0, 3.0, 4.0, 6.0])
    assert grpo.zero_spread_fraction(rewards, torch.tensor([0, 0, 2, 2, 4, 4])) == pytest.approx(1 / 3)


def loop_surrogate(logp, old, adv, clip_low, clip_high):
    """float64 loop: per-token loss -min(r A, clip(r) A), d loss / d logp, and whether the clip is active."""
    loss, grad, clipped = [], [], []
    for lrow, orow, a in zip(logp, old, adv):
        for lp, op in zip(lrow, orow):
            r = math.exp(lp - op)
            unclipped, clip = -a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high)
            loss.append(max(unclipped, clip))
            grad.append(-a * r if unclipped >= clip else 0.0)  # the clipped branch is constant
            clipped.append(clip > unclipped)
    return loss, grad, clipped


def test_clipped_surrogate_matches_a_float64_loop_on_ordinary_ratios():
    gen = torch.Generator().manual_seed(5)
    old = -3 * torch.rand(4, 6, generator=gen, dtype=torch.float64)
    logp = (old + 0.6 * torch.randn(4, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.3, -0.7, 0.0, -2.0], dtype=torch.float64)
    loss, clipped = grpo.clipped_surrogate(logp, old, adv, 0.2, 0.28)
    loss.sum().backward()
    want, grad, want_clipped = loop_surrogate(logp.tolist(), old.tolist(), adv.tolist(), 0.2, 0.28)
    torch.testing.assert_close(loss.flatten(), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp.grad.flatten(), torch.tensor(grad, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert clipped.flatten().tolist() == want_clipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_surrogate_is_finite_with_floored_logprobs(dtype):
    """Log-probs floored at LOGP_FLOOR (a token outside the top-p nucleus) on either side of the ratio:
    with grpo.epochs > 1 a token can re-enter the nucleus (old floored, ratio e^9998) or leave it."""
    from rntp.forward.packing import LOGP_FLOOR

    f = LOGP_FLOOR
    old = torch.tensor([[f, -2.0, -1.0], [f, -2.0, -1.0], [f, -2.0, -1.0]], dtype=dtype)
    logp = torch.tensor([[-2.0, f, -1.0]] * 3, dtype=dtype, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 0.0], dtype=dtype)  # a zero advantage (a masked row) too
    loss, clipped = grpo.clipped_surrogate(logp, old, adv, 0.2, 0.28)
    loss.sum().backward()
    loss = loss.detach()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    # A > 0, re-entered: the clipped branch, value -(1 + eps_high) A, no gradient
    assert bool(clipped[0, 0]) and float(loss[0, 0]) == pytest.approx(-1.28) and float(logp.grad[0, 0]) == 0.0
    # A > 0, left: the ratio is ~0, unclipped (pessimistic), loss ~0 and no gradient
    assert not bool(clipped[0, 1]) and abs(float(loss[0, 1])) < 1e-6 and float(logp.grad[0, 1]) == 0.0
    # A < 0, left: the clipped branch, (1 - eps_low) |A|
    assert bool(clipped[1, 1]) and float(loss[1, 1]) == pytest.approx(0.8) and float(logp.grad[1, 1]) == 0.0
    # ordinary tokens beside them: ratio 1, d loss / d logp = -A
    assert logp.grad[:, 2].tolist() == [-1.0, 1.0, 0.0] and loss[2].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k3_kl_is_finite_with_floored_logprobs(dtype):
    from rntp.forward.packing import LOGP_FLOOR

    # policy floored (reference not): delta = 9998 would give exp -> inf; reference floored: delta = -9998
    p = torch.tensor([LOGP_FLOOR, -2.0, -1.0], dtype=dtype, requires_grad=True)
    q = torch.tensor([-2.0, LOGP_FLOOR, -1.5], dtype=dtype)
    kl = grpo.k3_kl(p, q)
    kl.sum().backward()
    kl = kl.detach()
    assert torch.isfinite(kl).all() and torch.isfinite(p.grad).all() and (kl >= 0).all()
    # the reference floored: exp(-9998) = 0, so k3 = 9998 - 1 and d/dp = 1 - exp(q - p) = 1, exactly as unbounded
    assert float(kl[1]) == pytest.approx(-LOGP_FLOOR - 2.0 - 1) and float(p.grad[1]) == pytest.approx(1.0)
    # an ordinary token is untouched
    assert float(kl[2]) == pytest.approx(math.exp(-0.5) + 0.5 - 1, rel=1e-6)
    assert float(p.grad[2]) == pytest.approx(1 - math.exp(-0.5), rel=1e-6)
