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
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm
from transformers import AutoTokenizer

from rewards import (RewardInputs, apply_reward_config, get_reward, no_think_logprobs, position_entropies,
                     reward_names, score_groups, token_logprobs)
from rewards.scoring import Scored, positions_per_pack
from rewards.functions import token_bytes_fn
from rntp import grpo, stopping
from rntp.checkpoint import find_checkpoint, load_trainer_state, rng_state, save_checkpoint, set_rng_state
from rntp.config import Config
from rntp.data import PositionStream
from rntp.distributed import (Engine, all_gather_object, all_reduce_sum, broadcast_object, init_distributed,
                              shutdown_distributed)
from rntp.evaluate import build_eval_set, evaluate_policy
from rntp.metrics import MetricsLogger, PhaseTimer, peak_memory_gb
from rntp.models import load_policy, load_trainable
from rntp.packing import build_packs, packed_logprobs
from rntp.prepare import resolve_model_path
from rntp.runfiles import clear_run, cut_jsonl, run_dir_problem
from rollout import SamplingSpec, ThinkTags, make_sampler
from rollout.spans import pad_id_of

log = logging.getLogger(__name__)


def update_policy(engine: Engine, ref, *, contexts: list[list[int]], rollouts: list, targets: list[list[int]],
                  scored: Scored, advantages: torch.Tensor, keep: torch.Tensor, cfg: Config,
                  micro_steps: int | None) -> dict:
    """`cfg.grpo.epochs` optimizer passes of the clipped surrogate over the kept thoughts.

    Each micro-pass is one shared-prefix pack (`rntp.packing`): whole groups, each context computed
    once for all its thoughts, forward and backward (`train.shared_prefix=false`: once per thought).
    With one epoch the ratio's old log-probs are the update forward's own (detached), so the first
    ratio is exactly 1 whatever scoring's code path and precision gave; with several, scoring's
    anchor every pass. The sampler's log-probs (`scored.behaviour_logprobs`) turn on the mismatch
    correction `cfg.grpo.mismatch_correction`: importance weights on each token's loss.

    The loss is normalised over the global batch (all ranks), and each rank's share is scaled by
    the world size because every backend averages gradients across ranks. With `micro_steps`
    set, every rank runs exactly that many forward/backward passes per optimizer step (sharded
    backends and DeepSpeed's accumulation need it), padding with a pack whose loss is masked.
    """
    g = cfg.grpo
    device, world = engine.info.device, engine.info.world_size
    horizon = len(targets[0])
    n_sampled = torch.tensor([r.n_sampled for r in rollouts])
    seqs, tokens, target_tokens = all_reduce_sum([float(keep.sum()), float(n_sampled[keep].sum()),
                                                  float(keep.sum()) * horizon])
    norm = grpo.LossNorm(g.loss_aggregation, int(seqs), int(tokens), cfg.rollout.max_thought_tokens)
    # scoring's per-thought values, compacted to [thought, token] (first n_sampled columns)
    width = max(1, int(n_sampled.max()))
    old_logp = compact(scored.thought_logprobs, scored.batch.thought_mask, width)
    behaviour = compact(scored.behaviour_logprobs, scored.batch.thought_mask, width) \
        if scored.behaviour_logprobs is not None else None
    per_pack = positions_per_pack(rollouts, cfg.train.micro_batch)
    kept_positions = sorted({r.group for r, k in zip(rollouts, keep.tolist()) if k})
    packs = build_packs(contexts, rollouts, targets, positions_per_pack=per_pack, shared=cfg.train.shared_prefix,
                        positions=kept_positions)
    passes = micro_steps or len(packs)
    stand_in = build_packs(contexts, rollouts, targets, positions_per_pack=1, positions=[0])[0]
    sampling = dict(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, autocast=cfg.model.autocast_bf16)
    stats = torch.zeros(6, dtype=torch.float64)  # policy loss, nll, kl, clipped, IS weight sum, corrected
    packed_tokens, grad_norm = 0, float("nan")
    for _ in range(g.epochs):
        for m in range(passes):
            # past this rank's packs, a pack with its loss masked keeps every rank's collectives in step
            rows, pack = packs[m] if m < len(packs) else stand_in
            live = keep[rows] & (m < len(packs))
            packed_tokens += pack.tokens
            out = packed_logprobs(engine.model, pack, **sampling)
            logp, thought_mask = per_row(out.logp, [pack.thoughts[i] for i in rows], width)
            target_logp, _ = per_row(out.logp, [pack.targets[i] for i in rows], horizon)
            thought_mask = thought_mask & live[:, None].to(device)
            mask = thought_mask.float()
            old = logp.detach() if g.epochs == 1 else old_logp[rows].to(device)
            tok_loss, clipped = grpo.clipped_surrogate(logp, old, advantages[rows].to(device), g.clip_low, g.clip_high)
            if behaviour is not None:
                weight, corrected = grpo.importance_weights(old - behaviour[rows].to(device), thought_mask,
                                                            g.mismatch_correction, g.is_cap, g.is_band)
                tok_loss = tok_loss * weight
                stats[4] += float(weight.sum())
                stats[5] += float(corrected.sum())
            loss = grpo.aggregate(tok_loss, mask, norm)
            stats[0] += loss.item()
            if ref is not None and g.kl_coef > 0:  # the reference under the same autocast as the policy
                with torch.no_grad():
                    ref_logp, _ = per_row(packed_logprobs(ref, pack, **sampling).logp,
                                          [pack.thoughts[i] for i in rows], width)
                kl = grpo.aggregate(grpo.k3_kl(logp, ref_logp), mask, norm)
                loss = loss + g.kl_coef * kl
                stats[2] += kl.item()
            if g.nll_coef > 0:  # optional next-token loss on the true continuation after the thought
                nll = -(target_logp * live[:, None].to(device)).sum() / max(target_tokens, 1)
                loss = loss + g.nll_coef * nll
                stats[1] += nll.item()
            engine.backward(loss * world)
            stats[3] += float((clipped & thought_mask).sum())
        grad_norm = engine.step()
    policy_loss, nll, kl, clipped, weights, corrected = all_reduce_sum(
        (stats / torch.tensor([g.epochs] * 3 + [1.0] * 3)).tolist())
    passed = max(tokens * g.epochs, 1)  # thought tokens over all passes
    out = {"loss/policy": policy_loss, "loss/nll": nll, "loss/clip_frac": clipped / passed,
           "optim/grad_norm": grad_norm, "update/packed_tokens": packed_tokens}
    if behaviour is not None:
        out.update({"mismatch/is_weight_mean": weights / passed, "mismatch/corrected_frac": corrected / passed})
    if g.kl_coef > 0:
        out["loss/kl"] = kl
    return out


def compact(values: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """[N, L-1] values under a per-row mask -> [N, width], each row's masked values first."""
    out = torch.zeros(values.shape[0], width, dtype=values.dtype)
    for i in range(values.shape[0]):
        row = values[i][mask[i]]
        out[i, : len(row)] = row
    return out


def per_row(values: torch.Tensor, spans: list[slice], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read-outs of a pack gathered per thought: [rows, width] values and their mask."""
    index = torch.zeros(len(spans), width, dtype=torch.long)
    mask = torch.zeros(len(spans), width, dtype=torch.bool)
    for j, span in enumerate(spans):
        count = span.stop - span.start
        index[j, :count] = torch.arange(span.start, span.stop)
        mask[j, :count] = True
    index, mask = index.to(values.device), mask.to(values.device)
    return values.float()[index] * mask, mask


SUMMED = ("groups/dropped", "data/", "tokens_per_s/")  # across ranks; time, memory and sync take the max


def max_sequence_len(cfg: Config, tags: ThinkTags) -> int:
    """The longest sequence the sampler sees: context, open tag, thought, close tag (and slack)."""
    return cfg.rollout.vllm.max_model_len or (cfg.data.chunk_tokens + len(tags.open_ids) +
                                              cfg.rollout.max_thought_tokens + len(tags.close_ids) + 8)


def make_ema(policy) -> torch.nn.Module:
    """The EMA teacher: a frozen float32 copy of the policy. float32 whatever the policy's dtype,
    since a step of 1 - decay (0.001) is below bfloat16's resolution and would never move it."""
    return copy.deepcopy(policy).float().eval().requires_grad_(False)


@torch.no_grad()
def follow(ema, weight: float, bucket: list[tuple[str, torch.Tensor]]) -> None:
    """Move the EMA teacher's parameters `weight` of the way towards the policy's (each bucket cast
    to the teacher's float32: DeepSpeed's bf16 engine hands out bf16 weights)."""
    params = dict(ema.named_parameters())
    for name, tensor in bucket:
        if name in params:
            params[name].lerp_(tensor.to(params[name].device, params[name].dtype), weight)


@torch.no_grad()
def sampler_sync_error(sampler, engine: Engine, rollout, target: list[int]) -> float:
    """Max |log p| difference between the sampler and the trainer on one rollout's full sequence."""
    seq = rollout.prompt_ids + rollout.thought_ids + target
    theirs = torch.tensor(sampler.prompt_logprobs([seq])[0][1:])
    ids = torch.tensor([seq], device=engine.info.device)
    engine.train(False)
    ours = token_logprobs(engine.model, ids, torch.ones_like(ids))[0].float().cpu()
    engine.train(True)
    return float((theirs - ours).abs().max())


def reduce_rows(rows: list[dict]) -> dict:
    """One metrics row from every rank's row: sums for counts and throughput, max for time and
    memory, mean for the rest."""
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows if r.get(key) is not None]
        if not values or not all(isinstance(v, (int, float)) for v in values):
            out[key] = rows[0][key]
        elif key.startswith(SUMMED):
            out[key] = sum(values)
        elif key.startswith(("time/", "memory/", "sync/", "mismatch/max_")):
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    return out


class StopRequest:
    """SIGTERM/SIGUSR1 (SLURM's preemption and time-limit warnings) ask the loop to checkpoint and
    leave at the end of the current step; any rank's request stops every rank. The handlers
    (`rntp.stopping`) are in place from the start, so a request during start-up counts too."""

    def __init__(self):
        stopping.install()

    @property
    def requested(self) -> bool:
        return stopping.requested()

    def any_rank(self) -> bool:
        return all_reduce_sum([float(self.requested)])[0] > 0

    def restore(self):
        stopping.restore()


def check_max_model_len(cfg: Config, tags: ThinkTags) -> None:
    """A sampler length below the longest sequence (chunk, tags, thought budget) would fail mid-run."""
    given = cfg.rollout.vllm.max_model_len
    thought = max(cfg.rollout.max_thought_tokens, (cfg.eval.max_thought_tokens or 0) if cfg.eval.every else 0)
    need = cfg.data.chunk_tokens + len(tags.open_ids) + thought + len(tags.close_ids)
    if given is not None and given < need:
        raise ValueError(f"rollout.vllm.max_model_len={given} is below the {need} tokens the longest sequence needs "
                         f"(data.chunk_tokens {cfg.data.chunk_tokens} + open tag {len(tags.open_ids)} + thought "
                         f"{thought} + close tag {len(tags.close_ids)}); raise it or leave it unset")


def load_tokenizer(path: str):
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a damaged tokenizer file: name the folder, not a parser traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {first}") from None


def train(cfg: Config) -> Path | None:
    stop = StopRequest()  # first: a SIGTERM during start-up ends the run cleanly too
    info = init_distributed()
    run_dir = Path(cfg.run_dir)
    # A folder holding a run is resumed or overwritten only when asked (rank 0 decides for all).
    resume_inside = bool(cfg.resume) and Path(cfg.resume).expanduser().resolve().is_relative_to(run_dir.resolve())
    problem = broadcast_object(run_dir_problem(run_dir, resume_inside, cfg.overwrite) if info.is_main else None)
    if problem:
        raise ValueError(problem)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in reward_names(cfg.reward):  # an unknown reward fails before any model loads
        get_reward(name)
    if cfg.train.positions_per_step % info.world_size:
        raise ValueError(f"train.positions_per_step={cfg.train.positions_per_step} must divide among "
                         f"{info.world_size} ranks")
    positions_per_rank = cfg.train.positions_per_step // info.world_size
    resume_dir = None
    if cfg.resume:  # rank 0 verifies the checkpoint (reading it once, not once per rank) for every rank
        found = None
        if info.is_main:
            try:
                found = find_checkpoint(cfg.resume)
            except (FileNotFoundError, ValueError) as e:
                found = e
        resume_dir = broadcast_object(found)
        if isinstance(resume_dir, Exception):
            raise resume_dir
    base_path = resolve_model_path(cfg.model.name_or_path)
    model_path = str(resume_dir or base_path)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)

    # Tokenizer, tags and data first (each rank its own documents): bad data or lengths are one
    # clear error before any model loads. Then the model, frozen initial copy, EMA teacher.
    tokenizer = load_tokenizer(model_path)
    pad_id = pad_id_of(tokenizer)
    tags = ThinkTags(tokenizer, cfg.rollout.open_tag, cfg.rollout.close_tag)
    check_max_model_len(cfg, tags)
    # One frozen copy of the initial model serves the KL reference, the "initial" reward baseline
    # and the entropy position filter (RPT's proxy model); it stays the initial model after a resume.
    needs_initial = cfg.grpo.kl_coef > 0 or cfg.reward.baseline == "initial" or cfg.data.position_policy == "entropy"
    initial = None  # loaded below; the entropy filter reads it only once positions are drawn
    stream = PositionStream(cfg.data, tokenizer, rank=info.rank, world_size=info.world_size,
                            entropy_fn=(lambda ids: position_entropies(initial, ids)) if needs_initial else None)
    problems = [p for p in all_gather_object(stream.problem()) if p]
    if problems:  # every rank stops, not only the one without data
        raise ValueError(problems[0])
    G = cfg.rollout.group_size
    passes = -(-positions_per_rank * G // cfg.train.micro_batch)
    fixed_passes = passes if info.world_size > 1 or cfg.dist.backend == "deepspeed" else None
    policy = load_trainable(model_path, cfg, info, passes)  # sharded as it loads under FSDP2 and ZeRO-3
    policy.train()
    initial = load_policy(base_path, cfg, info.device).eval().requires_grad_(False) if needs_initial else None
    sharded = cfg.dist.backend == "fsdp2" or (cfg.dist.backend == "deepspeed" and cfg.dist.zero_stage == 3)
    ema = make_ema(load_policy(model_path, cfg, info.device) if sharded else policy) \
        if cfg.reward.baseline == "ema" else None
    baseline_model = {"policy": None, "initial": initial, "ema": ema}[cfg.reward.baseline]
    token_bytes = token_bytes_fn(tokenizer)
    # sharded weights cannot generate rank by rank: the transformers sampler gets a whole copy
    sampler_model = load_policy(model_path, cfg, info.device).eval() if cfg.rollout.sampler == "hf" and sharded \
        else None

    # The training engine (plain, DDP, DeepSpeed ZeRO or FSDP2) with its optimizer and schedule.
    engine = Engine(policy, cfg, info, passes, cfg.train.steps)
    evalset = None
    if cfg.eval.every:  # fixed held-out positions (the same on every rank); difficulty by the base model
        difficulty_path = resolve_model_path(cfg.eval.base_model) if cfg.eval.base_model else base_path
        engine.train(False)
        evalset = build_eval_set(cfg, tokenizer, engine.model if difficulty_path == model_path else
                                 load_policy(difficulty_path, cfg, info.device))
        engine.train(True)
    start_step = 0
    if resume_dir is not None:
        state = load_trainer_state(resume_dir)
        if len(state["ranks"]) != info.world_size:
            raise ValueError(f"{resume_dir} was written by {len(state['ranks'])} ranks; resume it on as many")
        engine.load(resume_dir, state)
        stream.load_state(state["ranks"][info.rank]["data"])
        set_rng_state(state["ranks"][info.rank]["rng"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_step = state["step"]
        log.info("resumed from %s at step %d", resume_dir, start_step)

    # The sampler: vLLM in-process where installed (one engine per rank or TP group), separately
    # started vLLM servers, or transformers.
    max_len = max_sequence_len(cfg, tags)
    sampler = make_sampler(cfg.rollout.sampler, model_path, tags, policy=sampler_model or policy,
                           dtype=cfg.model.dtype, seed=cfg.train.seed, max_model_len=max_len,
                           vllm_cfg=cfg.rollout.vllm, server_cfg=cfg.rollout.server)
    if cfg.rollout.sampler == "server":  # servers start from the model on their disk, not this run's weights
        sampler.push_weights(engine.weights(cfg.dist.weight_bucket_mb))
    if stop.any_rank():  # asked to stop during start-up: nothing trained, nothing new to save
        log.warning("stop requested during start-up; leaving before step %d with nothing new to save", start_step + 1)
        sampler.close()
        stop.restore()
        shutdown_distributed()
        return resume_dir
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    metrics = samples_file = None
    if info.is_main:
        if cfg.overwrite and not resume_inside:  # asked for; after every check, before the first write
            clear_run(run_dir)
        (run_dir / "config.yaml").write_text(config_yaml)
        metrics = MetricsLogger(run_dir, cfg.model_dump(mode="json"), wandb_mode=cfg.log.wandb_mode,
                                project=cfg.log.wandb_project, group=cfg.log.wandb_group, resume_step=start_step)
        cut_jsonl(run_dir / "samples.jsonl", start_step)  # a crashed run's samples after its checkpoint go
        samples_file = open(run_dir / "samples.jsonl", "a")
    dropped_groups = dropped_low_spread = 0
    bar = tqdm(range(start_step + 1, cfg.train.steps + 1), initial=start_step, total=cfg.train.steps,
               disable=not (cfg.log.progress and info.is_main), desc="train", dynamic_ncols=True)
    step = start_step
    for step in bar:
        timer = PhaseTimer()
        positions = stream.take(positions_per_rank)

        # 1. Sample G thoughts per position.
        with timer("sample"):
            spec = SamplingSpec(G, cfg.rollout.max_thought_tokens, cfg.rollout.temperature, cfg.rollout.top_p,
                                seed=(cfg.train.seed * 100_003 + step) * 1009 + info.rank)
            rollouts = sampler.sample([tags.prompt(p.context) for p in positions], spec)
            sampler.sleep()  # a colocated engine frees its accelerator memory for scoring and update

        # 2. Score: one pass gives the no-think score, the thoughts' old log-probs and the reward.
        with timer("score"):
            engine.train(False)
            targets = [p.target for p in positions]
            scored = score_groups(engine.model, [p.context for p in positions], rollouts, targets, pad_id,
                                  cfg.train.micro_batch, cfg.model.autocast_bf16,
                                  temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  shared=cfg.train.shared_prefix)
            no_think = scored.no_think_logprobs
            engine.train(True)

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
        advantages = torch.zeros_like(rewards)
        if keep.any():
            _, kept_group = torch.unique(group[keep], return_inverse=True)
            scale = cfg.grpo.advantage_scale
            advantages[keep] = grpo.group_advantages(rewards[keep], kept_group, "none" if scale == "batch" else scale)
        if cfg.grpo.advantage_scale == "batch":  # the std of the whole batch, across ranks
            std = grpo.pooled_std(*all_reduce_sum([float(keep.sum()), float(advantages[keep].sum()),
                                                   float((advantages[keep] ** 2).sum())]))
            advantages = advantages / (std + 1e-6)
        if cfg.grpo.drop_negative_advantages:
            advantages = advantages.clamp(min=0)

        # 4. Policy update on the thought tokens.
        with timer("update"):
            update = update_policy(engine, initial, contexts=[p.context for p in positions], rollouts=rollouts,
                                   targets=targets, scored=scored, advantages=advantages, keep=keep, cfg=cfg,
                                   micro_steps=fixed_passes) if all_reduce_sum([float(keep.sum())])[0] > 0 else {}
            lr = engine.lr()
            if update:  # the schedule follows optimizer steps: a step that kept no group leaves lr as it is
                engine.step_scheduler()

        # 5. New weights to the sampler (and the EMA teacher), in buckets gathered from any shards.
        with timer("sync"):
            weights = engine.weights(cfg.dist.weight_bucket_mb)
            if ema is not None:  # the EMA teacher follows the policy slowly (RLP), from the same gather
                weights = weights.tap(partial(follow, ema, 1 - cfg.reward.ema_decay))
            sampler.push_weights(weights)

            sync_diff = None
            if cfg.rollout.check_sync_every and step % cfg.rollout.check_sync_every == 0 and \
                    hasattr(sampler, "prompt_logprobs"):
                sync_diff = sampler_sync_error(sampler, engine, rollouts[0], positions[rollouts[0].group].target)

        # 6. Metrics (reduced over ranks), samples, evaluation, checkpoint.
        H = cfg.data.horizon
        with_think = scored.target_logprobs.sum(-1) / H
        without = no_think[group].sum(-1) / H
        thought_len = torch.tensor([float(r.n_sampled) for r in rollouts])
        sampled_tokens = int(thought_len.sum())
        open_len = len(tags.open_ids)  # the open tag is several tokens with most tokenizers
        scored_tokens = sum(p.p + H for p in positions) + sum(open_len + len(r.thought_ids) + H for r in rollouts)
        # the tokens of the kept sequences as if unshared, so that shared and unshared rates compare
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
            **({"sync/max_logprob_diff": sync_diff} if sync_diff is not None else {}),
            **({f"mismatch/{k}": v for k, v in grpo.mismatch_stats(scored.thought_logprobs, scored.behaviour_logprobs,
                                                                   scored.batch.thought_mask).items()}
               if scored.behaviour_logprobs is not None else {}),
        }
        if evalset is not None and step % cfg.eval.every == 0:
            with timer("eval"):
                result = evaluate_policy(engine.model, sampler, tags, evalset, cfg, progress=False)
            row.update({f"eval/{k}": v for k, v in result["metrics"].items()})
            row["time/eval"] = timer.seconds["eval"]
        row = reduce_rows(all_gather_object(row))
        if info.is_main:
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
        stopping = stop.any_rank()
        if step == cfg.train.steps or stopping or (cfg.train.save_every and step % cfg.train.save_every == 0):
            rank_state = {"data": stream.state(), "rng": rng_state()}
            common = {"ema": ema.state_dict()} if ema is not None else {}
            save_checkpoint(run_dir, step, engine, tokenizer, rank_state, common, config_yaml)
        if stopping:
            log.warning("stopped at step %d on request; resume with resume=%s", step, run_dir)
            break

    stop.restore()
    sampler.close()
    final = find_checkpoint(run_dir, checksums=False)  # just written and verified by size; no re-hash
    if info.is_main:
        samples_file.close()
        plot = metrics.plot() if cfg.log.plot else None
        metrics.finish()
        print(f"checkpoint: {final}\nmetrics:    {metrics.path}\nsamples:    {run_dir / 'samples.jsonl'}"
              + (f"\nplot:       {plot}" if plot else ""))
    shutdown_distributed()
    return final
