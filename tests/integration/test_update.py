"""The update's forward passes on CPU under the conditions of GPU runs (bf16 autocast)."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.integration.dist_worker import fixed_global_batch

pytestmark = pytest.mark.integration


def test_kl_reference_runs_under_the_policy_autocast(tiny_model_dir):
    """With the reference equal to the policy, the KL of the first pass is 0 only if both forwards
    run at the same precision (the reference once ran in fp32 beside a bf16-autocast policy)."""
    from rntp.forward.scoring import score_groups
    from rntp import grpo
    from rntp.config import load_config
    from rntp.distributed import DistInfo
    from rntp.engines import make_engine
    from rntp.train import update_policy

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.autocast_bf16=true", "grpo.kl_coef=0.1",
                             "train.micro_batch=16", "rollout.group_size=4", "train.positions_per_step=4"])
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    contexts, rollouts, targets, rewards = fixed_global_batch(policy.config.vocab_size)
    scored = score_groups(policy.eval(), contexts, rollouts, targets, pad_id=0, micro_batch=16, autocast=True)
    policy.train()
    advantages = grpo.group_advantages(rewards, torch.tensor([r.group for r in rollouts]), "group")
    engine = make_engine(policy, cfg, DistInfo(), 1, total_steps=1)
    stats = update_policy(engine, ref=ref, contexts=contexts, rollouts=rollouts, targets=targets, scored=scored,
                          advantages=advantages, keep=torch.ones(len(rollouts), dtype=torch.bool), cfg=cfg)
    assert stats["loss/kl"] == 0.0


def update_once(policy, scored, rewards, rollouts, contexts, targets, *overrides):
    from rntp import grpo
    from rntp.config import load_config
    from rntp.distributed import DistInfo
    from rntp.engines import make_engine
    from rntp.train import update_policy

    cfg = load_config(None, ["train.micro_batch=16", "rollout.group_size=4", "train.positions_per_step=4",
                             *overrides])
    advantages = grpo.group_advantages(rewards, torch.tensor([r.group for r in rollouts]), "group")
    engine = make_engine(policy.train(), cfg, DistInfo(), 1, total_steps=1)
    return update_policy(engine, ref=None, contexts=contexts, rollouts=rollouts, targets=targets, scored=scored,
                         advantages=advantages, keep=torch.ones(len(rollouts), dtype=torch.bool), cfg=cfg)


def test_one_epoch_ratio_is_exactly_one_in_bf16(tiny_model_dir):
    """Scoring (cached context, eval) and the update (full sequences) differ by bf16 noise; with one
    epoch the ratio takes its old log-probs from the update's own forward, so nothing is clipped even
    with a clip range far below that noise. Two epochs anchor to scoring and do clip."""
    from rntp.forward.scoring import score_groups

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    contexts, rollouts, targets, rewards = fixed_global_batch(policy.config.vocab_size)
    tight = ["model.autocast_bf16=true", "grpo.clip_low=1e-5", "grpo.clip_high=1e-5"]
    scored = score_groups(policy.eval(), contexts, rollouts, targets, pad_id=0, micro_batch=16, autocast=True)
    assert update_once(policy, scored, rewards, rollouts, contexts, targets, *tight)["loss/clip_frac"] == 0.0
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert update_once(policy, scored, rewards, rollouts, contexts, targets, *tight,
                       "grpo.epochs=2")["loss/clip_frac"] > 0


def test_a_mismatched_sampler_shows_in_the_metrics_and_gets_weighted(tiny_model_dir, tokenizer):
    """Sampling at temperature 0.7 while the trainer believes 1.0: the mismatch metrics rise, and the
    update's importance weights are min(exp(trainer - sampler), C), computed here independently."""
    from rntp.forward.scoring import score_groups
    from rntp import grpo
    from rollout import SamplingSpec, ThinkTags, make_sampler

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tags = ThinkTags(tokenizer)
    contexts = [tokenizer.encode(t, add_special_tokens=False) for t in
                ("The value returned by the function is", "Each line of the file", "A list of names")]
    sampler = make_sampler("hf", str(tiny_model_dir), tags, policy=policy)
    rollouts = sampler.sample([tags.prompt(c) for c in contexts], SamplingSpec(n=4, max_tokens=6, temperature=0.7,
                                                                               seed=3))
    targets = [tokenizer.encode(" of the module.", add_special_tokens=False)[:3]] * 3
    matched = score_groups(policy.eval(), contexts, rollouts, targets, pad_id=0, micro_batch=16, temperature=0.7)
    # the trainer at temperature 1.0
    believed = score_groups(policy, contexts, rollouts, targets, pad_id=0, micro_batch=16)
    mask = matched.batch.thought_mask
    assert grpo.mismatch_stats(matched.thought_logprobs, matched.behaviour_logprobs, mask)["max_abs_log_ratio"] < 1e-4
    off = grpo.mismatch_stats(believed.thought_logprobs, believed.behaviour_logprobs, mask)
    assert off["mean_abs_log_ratio"] > 0.03 and off["kl_k3"] > 1e-3

    deltas = [t - b for i, r in enumerate(rollouts) for t, b in
              zip(believed.thought_logprobs[i][mask[i]].double().tolist(), r.behaviour_logprobs)]
    expected_weight = sum(min(math.exp(d), 1.1) for d in deltas) / len(deltas)
    expected_capped = sum(math.exp(d) > 1.1 for d in deltas) / len(deltas)
    rewards = torch.randn(len(rollouts), generator=torch.Generator().manual_seed(0))
    out = update_once(policy, believed, rewards, rollouts, contexts, targets, "grpo.mismatch_correction=token_tis",
                      "grpo.is_cap=1.1")
    assert out["mismatch/is_weight_mean"] == pytest.approx(expected_weight, rel=1e-4)
    assert out["mismatch/corrected_frac"] == pytest.approx(expected_capped, abs=1e-9)
    assert 0 < expected_capped < 1


@pytest.mark.parametrize("aggregation, micro_batch, checkpointing", [("seq_mean", 5, False), ("token_mean", 12, False),
                                                                      ("seq_mean", 12, True)])
def test_shared_update_gradients_equal_the_unshared_update(aggregation, micro_batch, checkpointing, tiny_model_dir):
    """The whole update (clipped surrogate, IS weights, NLL term, micro-packs of whole groups: one
    position each, or four, three of them of one chunk) with each context computed once equals the
    update computing it once per thought (float64)."""
    from rntp.forward.scoring import score_groups
    from rntp import grpo
    from rntp.config import load_config
    from rntp.distributed import DistInfo
    from rntp.engines import make_engine
    from rntp.train import update_policy
    from tests.integration.test_packing import chunk_positions, load64

    contexts, rollouts, targets = chunk_positions()
    for i, r in enumerate(rollouts):  # a sampler's log-probs, slightly off the trainer's
        r.behaviour_logprobs = [-3.0 - 0.1 * ((i + j) % 5) for j in range(r.n_sampled)]
    rewards = torch.randn(len(rollouts), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    advantages = grpo.group_advantages(rewards, torch.tensor([r.group for r in rollouts]), "group").float()

    def gradients(shared):
        cfg = load_config(None, [f"train.micro_batch={micro_batch}", "rollout.group_size=3",
                                 "train.positions_per_step=4", f"train.shared_prefix={str(shared).lower()}",
                                 "grpo.nll_coef=0.3", "grpo.no_think_nll_coef=0.2",
                                 f"grpo.loss_aggregation={aggregation}", "rollout.temperature=0.9"])
        model = load64(tiny_model_dir)
        if checkpointing:  # the shared context's activations are recomputed in backward too
            model.gradient_checkpointing_enable()
        scored = score_groups(model.eval(), contexts, rollouts, targets, pad_id=0, micro_batch=micro_batch,
                              temperature=0.9, shared=shared)
        engine = make_engine(model.train(), cfg, DistInfo(), 1, total_steps=1)
        seen = {}
        step = engine.step
        engine.step = lambda: seen.update({n: p.grad.clone() for n, p in model.named_parameters()}) or step()
        update_policy(engine, ref=None, contexts=contexts, rollouts=rollouts, targets=targets, scored=scored,
                      advantages=advantages, keep=torch.ones(len(rollouts), dtype=torch.bool), cfg=cfg)
        return seen

    shared, unshared = gradients(True), gradients(False)
    for name, g in unshared.items():
        assert g.abs().max() > 0, name
        assert ((shared[name] - g).abs().max() / g.abs().max()) < 1e-9, name


def update_gradients(model_dir, overrides: list[str], advantages, keep):
    """One update of a float64 tiny model on `chunk_positions()` (micro-batch 6, G=3, 4 positions): its
    metrics and the gradients the optimizer step saw."""
    from rntp.config import load_config
    from rntp.distributed import DistInfo
    from rntp.engines import make_engine
    from rntp.forward.scoring import score_groups
    from rntp.train import update_policy
    from tests.integration.test_packing import chunk_positions, load64

    contexts, rollouts, targets = chunk_positions()
    cfg = load_config(None, ["train.micro_batch=6", "rollout.group_size=3", "train.positions_per_step=4",
                             *overrides])
    model = load64(model_dir)
    scored = score_groups(model.eval(), contexts, rollouts, targets, pad_id=0, micro_batch=6)
    engine = make_engine(model.train(), cfg, DistInfo(), 1, total_steps=1)
    seen = {}
    step = engine.step
    engine.step = lambda: seen.update({n: p.grad.clone() for n, p in model.named_parameters()}) or step()
    out = update_policy(engine, ref=None, contexts=contexts, rollouts=rollouts, targets=targets, scored=scored,
                        advantages=advantages, keep=keep, cfg=cfg)
    return out, seen


def test_the_no_think_term_is_the_plain_language_model_loss_on_kept_positions(tiny_model_dir):
    """`grpo.no_think_nll_coef` alone (zero advantages): its value and gradient equal the plain next-token
    loss on context + target, averaged over the positions whose groups were kept (float64)."""
    from tests.integration.test_packing import chunk_positions, load64
    from tests.integration.test_packing import reference as reference_logprobs

    contexts, rollouts, targets = chunk_positions()
    keep = torch.tensor([r.group != 1 for r in rollouts])  # position 1's group was dropped
    out, seen = update_gradients(tiny_model_dir, ["grpo.no_think_nll_coef=1.0"], torch.zeros(len(rollouts)), keep)

    model64 = load64(tiny_model_dir)
    kept = sorted({r.group for r, k in zip(rollouts, keep.tolist()) if k})
    assert kept == [0, 2, 3]
    # -mean log p(target | context), each position its own unpadded float64 forward
    losses = [-reference_logprobs(model64, contexts[g] + targets[g], len(contexts[g]), len(targets[g])).mean()
              for g in kept]
    loss = sum(losses) / len(losses)
    loss.backward()
    assert out["loss/no_think_nll"] == pytest.approx(float(loss), rel=1e-6)  # metrics are summed in float32
    for name, p in model64.named_parameters():  # the update reads log-probs out in float32 (`per_row`)
        assert p.grad.abs().max() > 0, name
        assert ((seen[name] - p.grad).abs().max() / p.grad.abs().max()) < 1e-6, name


@pytest.mark.parametrize("pg_coef", [0.0, 0.5, 1.0])
def test_pg_coef_weighs_only_the_policy_gradient(pg_coef, tiny_model_dir):
    """`grpo.pg_coef` scales the clipped surrogate and nothing else: with nonzero advantages and both
    next-token terms on, the step's gradients equal pg_coef x the surrogate's plus the nll and no-think
    terms', each computed here independently (unpadded float64 forwards). pg_coef=0 (the ablation's
    control) leaves exactly the next-token terms; 1 is the surrogate as before the coefficient existed."""
    from tests.integration.test_packing import chunk_positions, load64
    from tests.integration.test_packing import reference as reference_logprobs

    contexts, rollouts, targets = chunk_positions()
    advantages = torch.tensor([1.5, -0.5, 0.8, -1.2, 0.4, 2.0, -0.7, 0.3])  # nonzero, as a reward would give
    out, seen = update_gradients(tiny_model_dir, ["grpo.nll_coef=0.3", "grpo.no_think_nll_coef=0.2",
                                                  f"grpo.pg_coef={pg_coef}"],
                                 advantages, torch.ones(len(rollouts), dtype=torch.bool))

    model64 = load64(tiny_model_dir)
    H, n = len(targets[0]), len(rollouts)
    surrogate, nll = 0.0, 0.0
    for a, r in zip(advantages.tolist(), rollouts):
        seq = r.prompt_ids + r.thought_ids + targets[r.group]
        if r.n_sampled:  # one epoch: ratio 1, so the surrogate's gradient is -A x that of the mean log-prob
            surrogate = surrogate - a * reference_logprobs(model64, seq, len(r.prompt_ids), r.n_sampled).mean() / n
        nll = nll - reference_logprobs(model64, seq, len(seq) - H, H).sum() / (n * H)
    plain = sum(-reference_logprobs(model64, c + t, len(c), H).mean() for c, t in zip(contexts, targets)) / 4
    (pg_coef * surrogate + 0.3 * nll + 0.2 * plain).backward()
    # logged unweighted: at ratio 1 the surrogate's value is -mean A over the thoughts that have tokens
    assert out["loss/policy"] == pytest.approx(-sum(a for a, r in zip(advantages.tolist(), rollouts) if r.n_sampled)
                                               / n, rel=1e-6)
    assert out["loss/nll"] == pytest.approx(float(nll.detach()), rel=1e-6)
    for name, p in model64.named_parameters():
        assert p.grad.abs().max() > 0, name
        assert ((seen[name] - p.grad).abs().max() / p.grad.abs().max()) < 1e-6, name
