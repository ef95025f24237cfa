"""The RNTP training loop.

One step: positions -> sample G thoughts each -> fused scoring (old log-probs of the thought
and log-probs of the true continuation, one forward) -> rewards -> group advantages ->
clipped loss on thought tokens -> optimizer step -> push weights to the sampler ->
metrics / checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from rewards import (RewardInputs, apply_reward_config, get_reward, no_think_logprobs, position_entropies,
                     reward_names, score_groups, token_logprobs)
from rewards.functions import token_bytes_fn
from rewards.scoring import SequenceBatch
from rntp import grpo
from rntp.checkpoint import find_checkpoint, load_trainer_state, save_checkpoint, set_rng_state
from rntp.config import Config
from rntp.data import PositionStream
from rntp.evaluate import build_eval_set, evaluate_policy
from rntp.metrics import MetricsLogger, PhaseTimer, peak_memory_gb
from rntp.prepare import resolve_model_path
from rollout import SamplingSpec, ThinkTags, make_sampler

log = logging.getLogger(__name__)


def load_policy(path: str, cfg: Config):
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def update_policy(policy, ref, optimizer, batch: SequenceBatch, old_logp: torch.Tensor, advantages: torch.Tensor,
                  cfg: Config) -> dict:
    """`cfg.grpo.epochs` optimizer passes of the clipped surrogate over one batch of rollouts."""
    g = cfg.grpo
    device = next(policy.parameters()).device
    norm = grpo.LossNorm.of(g.loss_aggregation, batch.thought_mask, cfg.rollout.max_thought_tokens)
    target_tokens = max(int(batch.target_mask.sum()), 1)
    mb_size = cfg.train.micro_batch
    stats = {"loss/policy": 0.0, "loss/nll": 0.0, "loss/kl": 0.0, "loss/clip_frac": 0.0}
    for _ in range(g.epochs):
        clipped_tokens = 0.0
        for s in range(0, len(batch), mb_size):
            rows = slice(s, s + mb_size)
            mb = batch.rows(rows).to(device)
            tail = mb.tail  # logits only where thoughts and targets are
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.model.autocast_bf16):
                logp = token_logprobs(policy, mb.input_ids, mb.attention_mask, tail=tail).float()
            thought_mask, target_mask = mb.thought_mask[:, -tail:], mb.target_mask[:, -tail:]
            mask = thought_mask.float()
            tok_loss, clipped = grpo.clipped_surrogate(logp, old_logp[rows, -tail:].to(device),
                                                       advantages[rows].to(device), g.clip_low, g.clip_high)
            loss = grpo.aggregate(tok_loss, mask, norm)
            stats["loss/policy"] += loss.item()
            if ref is not None and g.kl_coef > 0:
                with torch.no_grad():
                    ref_logp = token_logprobs(ref, mb.input_ids, mb.attention_mask, tail=tail).float()
                kl = grpo.aggregate(grpo.k3_kl(logp, ref_logp), mask, norm)
                loss = loss + g.kl_coef * kl
                stats["loss/kl"] += kl.item()
            if g.nll_coef > 0:  # optional next-token loss on the true continuation after the thought
                nll = -(logp * target_mask).sum() / target_tokens
                loss = loss + g.nll_coef * nll
                stats["loss/nll"] += nll.item()
            loss.backward()
            clipped_tokens += float((clipped & thought_mask).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats["loss/clip_frac"] = clipped_tokens / max(norm.num_tokens, 1)
    stats = {k: v / g.epochs if k != "loss/clip_frac" else v for k, v in stats.items()}
    stats["optim/grad_norm"] = float(grad_norm)
    if g.kl_coef == 0:
        del stats["loss/kl"]
    return stats


def train(cfg: Config) -> Path:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in reward_names(cfg.reward):  # an unknown reward fails before any model loads
        get_reward(name)
    resume_dir = find_checkpoint(cfg.resume) if cfg.resume else None
    base_path = resolve_model_path(cfg.model.name_or_path)
    model_path = str(resume_dir or base_path)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)

    # Model, reference, tokenizer, tags, data.
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy = load_policy(model_path, cfg)
    policy.train()
    # One frozen copy of the initial model serves the KL reference, the "initial" reward baseline
    # and the entropy position filter (RPT's proxy model); it stays the initial model after a resume.
    needs_initial = cfg.grpo.kl_coef > 0 or cfg.reward.baseline == "initial" or cfg.data.position_policy == "entropy"
    initial = load_policy(base_path, cfg).eval().requires_grad_(False) if needs_initial else None
    ema = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.reward.baseline == "ema" else None
    baseline_model = {"policy": None, "initial": initial, "ema": ema}[cfg.reward.baseline]
    tags = ThinkTags(tokenizer, cfg.rollout.open_tag, cfg.rollout.close_tag)
    token_bytes = token_bytes_fn(tokenizer)
    stream = PositionStream(cfg.data, tokenizer, entropy_fn=(lambda ids: position_entropies(initial, ids))
                            if initial is not None else None)
    evalset = None
    if cfg.eval.every:  # fixed held-out positions; difficulty by the base model
        difficulty_path = resolve_model_path(cfg.eval.base_model) if cfg.eval.base_model else base_path
        evalset = build_eval_set(cfg, tokenizer, policy if difficulty_path == model_path else
                                 load_policy(difficulty_path, cfg))

    # Optimizer and schedule.
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    schedule = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.optim.schedule]
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                              num_training_steps=cfg.train.steps)
    start_step = 0
    if resume_dir is not None:
        state = load_trainer_state(resume_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state(state["data"])
        set_rng_state(state["rng"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_step = state["step"]
        log.info("resumed from %s at step %d", resume_dir, start_step)

    # The sampler: vLLM in-process where installed, else transformers on the policy itself.
    max_len = cfg.data.chunk_tokens + len(tags.open_ids) + cfg.rollout.max_thought_tokens + len(tags.close_ids) + 8
    sampler = make_sampler(cfg.rollout.sampler, model_path, tags, policy=policy, dtype=cfg.model.dtype,
                           seed=cfg.train.seed, max_model_len=max_len, vllm_cfg=cfg.rollout.vllm)
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    (run_dir / "config.yaml").write_text(config_yaml)
    metrics = MetricsLogger(run_dir, cfg.model_dump(mode="json"), wandb_mode=cfg.log.wandb_mode,
                            project=cfg.log.wandb_project, group=cfg.log.wandb_group, resume_step=start_step)
    samples_file = open(run_dir / "samples.jsonl", "a")
    dropped_groups = dropped_low_spread = 0
    G = cfg.rollout.group_size
    bar = tqdm(range(start_step + 1, cfg.train.steps + 1), initial=start_step, total=cfg.train.steps,
               disable=not cfg.log.progress, desc="train", dynamic_ncols=True)
    for step in bar:
        timer = PhaseTimer()
        positions = stream.take(cfg.train.positions_per_step)

        # 1. Sample G thoughts per position.
        with timer("sample"):
            spec = SamplingSpec(G, cfg.rollout.max_thought_tokens, cfg.rollout.temperature, cfg.rollout.top_p,
                                seed=cfg.train.seed * 100_003 + step)
            rollouts = sampler.sample([tags.prompt(p.context) for p in positions], spec)

        # 2. Score: one pass gives the no-think score, the thoughts' old log-probs and the reward.
        with timer("score"):
            policy.eval()
            targets = [p.target for p in positions]
            scored = score_groups(policy, [p.context for p in positions], rollouts, targets, pad_id,
                                  cfg.train.micro_batch, cfg.model.autocast_bf16)
            no_think = scored.no_think_logprobs
            policy.train()

        # 3. Rewards and group-relative advantages. A group with a NaN/inf reward is dropped whole;
        #    with dynamic sampling, so is a group whose rewards barely differ.
        group = torch.tensor([r.group for r in rollouts])
        closed = torch.tensor([r.closed for r in rollouts])
        if baseline_model is not None:
            baseline = no_think_logprobs(baseline_model, [p.context for p in positions], targets, pad_id,
                                         cfg.train.micro_batch, cfg.model.autocast_bf16)
        else:
            baseline = no_think
        inputs = RewardInputs(scored.target_ids, scored.target_logprobs, baseline[group], scored.target_pred,
                              [r.thought_ids[: r.n_sampled] for r in rollouts], closed, group,
                              token_bytes=token_bytes, decode=tokenizer.decode, options=cfg.reward)
        rewards = apply_reward_config(cfg.reward, inputs)
        keep = grpo.finite_groups(rewards, group)
        dropped_groups += len(positions) - len(set(group[keep].tolist()))
        if cfg.grpo.min_group_std > 0 and keep.any():
            spread = grpo.group_std(torch.where(keep, rewards, 0.0), group) > cfg.grpo.min_group_std
            dropped_low_spread += int((~spread[group] & keep).sum()) // G
            keep &= spread[group]

        # 4. Policy update on the thought tokens.
        with timer("update"):
            if keep.any():
                _, kept_group = torch.unique(group[keep], return_inverse=True)
                advantages = grpo.group_advantages(rewards[keep], kept_group, cfg.grpo.advantage_scale)
                if cfg.grpo.drop_negative_advantages:
                    advantages = advantages.clamp(min=0)
                idx = keep.nonzero().squeeze(1)
                update = update_policy(policy, initial, optimizer, scored.batch.rows(idx),
                                       scored.thought_logprobs[idx], advantages, cfg)
            else:
                update = {}
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            if ema is not None:  # the EMA teacher follows the policy slowly (RLP)
                with torch.no_grad():
                    for p_ema, p in zip(ema.parameters(), policy.parameters()):
                        p_ema.lerp_(p, 1 - cfg.reward.ema_decay)

        # 5. New weights to the sampler.
        with timer("sync"):
            sampler.push_weights(policy.state_dict().items())

        # 6. Metrics, samples, checkpoint.
        H = cfg.data.horizon
        with_think = scored.target_logprobs.sum(-1) / H
        without = no_think[group].sum(-1) / H
        thought_len = torch.tensor([float(r.n_sampled) for r in rollouts])
        sampled_tokens = int(thought_len.sum())
        scored_tokens = sum(p.p + H for p in positions) + sum(len(r.thought_ids) + 1 + H for r in rollouts)
        update_tokens = int(scored.batch.attention_mask[keep].sum()) * cfg.grpo.epochs
        finite = rewards[torch.isfinite(rewards)]
        row = {
            "reward/mean": finite.mean().item() if finite.numel() else None,
            "reward/std": finite.std().item() if finite.numel() > 1 else None,
            "score/with_think": with_think.mean().item(),
            "score/no_think": without.mean().item(),
            "info_gain": (with_think - without).mean().item(),
            "groups/zero_spread_frac": grpo.zero_spread_fraction(rewards[keep], group[keep]) if keep.any() else None,
            "groups/dropped_nonfinite": dropped_groups,
            "groups/dropped_low_spread": dropped_low_spread,
            **({"score/baseline": (baseline[group].sum(-1) / H).mean().item()} if baseline_model is not None else {}),
            "thought/len_mean": thought_len.mean().item(),
            "thought/truncated_frac": 1.0 - closed.float().mean().item(),
            "policy/entropy": scored.thought_entropy.mean().item(),
            "optim/lr": lr,
            **update,
            **{f"time/{k}": v for k, v in timer.seconds.items()},
            "time/step": sum(timer.seconds.values()),
            "tokens_per_s/sample": sampled_tokens / timer.seconds["sample"],
            "tokens_per_s/score": scored_tokens / timer.seconds["score"],
            "tokens_per_s/update": update_tokens / timer.seconds["update"],
            "memory/peak_gb": peak_memory_gb(),
            **{f"data/{k}": v for k, v in stream.stats.items()},
        }
        if evalset is not None and step % cfg.eval.every == 0:
            with timer("eval"):
                result = evaluate_policy(policy, sampler, tags, evalset, cfg, progress=False)
            row.update({f"eval/{k}": v for k, v in result["metrics"].items()})
            row["time/eval"] = timer.seconds["eval"]
        metrics.log(step, row)
        for r, reward in list(zip(rollouts, rewards.tolist()))[: cfg.log.sample_thoughts]:
            pos = positions[r.group]
            samples_file.write(json.dumps({
                "step": step, "reward": reward, "context_tail": tokenizer.decode(pos.context[-48:]),
                "thought": tokenizer.decode(r.thought_ids), "target": tokenizer.decode(pos.target),
            }, ensure_ascii=False) + "\n")
        samples_file.flush()
        bar.set_postfix(reward=f"{row['reward/mean'] or float('nan'):.2f}", gain=f"{row['info_gain']:+.3f}",
                        tok_s=f"{row['tokens_per_s/sample']:.0f}")
        if step == cfg.train.steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
            trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "data": stream.state(), **({"ema": ema.state_dict()} if ema is not None else {})}
            save_checkpoint(run_dir, step, policy, tokenizer, trainer_state, config_yaml)

    samples_file.close()
    plot = metrics.plot() if cfg.log.plot else None
    metrics.finish()
    sampler.close()
    final = find_checkpoint(run_dir)
    print(f"checkpoint: {final}\nmetrics:    {metrics.path}\nsamples:    {run_dir / 'samples.jsonl'}"
          + (f"\nplot:       {plot}" if plot else ""))
    return final
