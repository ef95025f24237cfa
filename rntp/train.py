"""The RNTP training loop: the seven steps of docs/method.md's "What one step does".

    positions -> sample G thoughts each -> score (old log-probs of the thought and log-probs of the
    true continuation, one fused forward) -> reward -> group advantages -> update (clipped loss on
    thought tokens, optimizer step) -> sync (weights to the sampler) -> log / checkpoint

`train` reads as those steps; each is a function below it. `start_run` builds what they share
(model, engine, sampler, data, logs) once.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Callable

import numpy as np
import torch
import yaml
from tqdm import tqdm
from transformers import AutoConfig

from rewards import RewardInputs, apply_reward_config, get_reward, reward_names
from rewards.functions import token_bytes_fn
from rntp import console, grpo, lora, stopping
from rntp.card import write_card
from rntp.checkpoint import find_checkpoint, load_trainer_state, rng_state, save_checkpoint, set_rng_state
from rntp.config import Config, check_max_model_len, max_sequence_len
from rntp.data import Position, PositionStream
from rntp.distributed import (DistInfo, all_gather_object, all_reduce_sum, barrier, broadcast_object,
                              init_distributed, shutdown_distributed)
from rntp.engines import Engine, engine_class, make_engine
from rntp.experiments.evaluate import EvalSet, build_eval_set, evaluate_policy, held_out_report
from rntp.metrics import MetricsLogger, MetricsRow, PhaseTimer, peak_memory_gb, reduce_rows
from rntp.models import load_policy, load_trainable
from rntp.forward import attention
from rntp.forward.packing import build_packs, check_packed_forward, packed_logprobs, packs_per_step
from rntp.prepare import resolve_model_path
from rntp.think_tokens import base_model_path, load_tokenizer, run_tokenizer
from rntp.rollout_queue import RolloutQueue
from rntp.runfiles import clear_run, cut_jsonl, resumes_inside, run_dir_problem
from rntp.forward.scoring import (Scored, no_think_logprobs, position_entropies, score_groups,
                          token_logprobs)
from rollout import Rollout, Sampler, SamplingSpec, ThinkTags, make_sampler
from rollout.spans import pad_id_of

log = logging.getLogger(__name__)


def update_policy(engine: Engine, *, ref: torch.nn.Module | None, contexts: list[list[int]], rollouts: list[Rollout],
                  targets: list[list[int]], scored: Scored, advantages: torch.Tensor, keep: torch.Tensor,
                  cfg: Config) -> dict:
    """`cfg.grpo.epochs` optimizer passes of the clipped surrogate over the kept thoughts.

    Each micro-pass is one shared-prefix pack (`rntp.forward.packing`): whole groups, each context computed
    once for all its thoughts, forward and backward (`train.shared_prefix=false`: once per thought).
    With one epoch the ratio's old log-probs are the update forward's own (detached), so the first
    ratio is exactly 1 whatever scoring's code path and precision gave; with several, scoring's
    anchor every pass. The sampler's log-probs (`scored.behaviour_logprobs`) turn on the mismatch
    correction `cfg.grpo.mismatch_correction`: importance weights on each token's loss. The surrogate
    is weighted by `cfg.grpo.pg_coef` (0: the ablation's control, next-token and KL terms only).

    The loss is normalised over the global batch (all ranks), and each rank's share is scaled by
    the world size because every backend averages gradients across ranks. Where the engine asks for
    `fixed_passes` (several ranks, DeepSpeed's accumulation), every rank runs exactly that many
    forward/backward passes per optimizer step, padding with a pack whose loss is masked. Each pass
    runs in `engine.micro_pass`, told whether it is the step's last, so DDP all-reduces once a step.
    """
    g = cfg.grpo
    inputs = UpdateInputs.of(engine, ref=ref, rollouts=rollouts, targets=targets, scored=scored,
                             advantages=advantages, keep=keep, cfg=cfg)
    packs = build_packs(contexts, rollouts, targets, micro_batch=cfg.train.micro_batch, shared=cfg.train.shared_prefix,
                        positions=inputs.kept_positions, no_think=g.no_think_nll_coef > 0)
    passes = engine.fixed_passes or len(packs)
    stand_in = build_packs(contexts, rollouts, targets, micro_batch=1, positions=[0])[0]
    stats = torch.zeros(7, dtype=torch.float64)  # policy loss, nll, kl, no-think nll, clipped, IS weights, corrected
    packed_tokens, read_tokens, attention_pairs, grad_norm = 0, 0, 0, float("nan")
    for _ in range(g.epochs):
        for m in range(passes):
            # all-reduce once per optimizer step: the backend may accumulate the others locally
            with engine.micro_pass(last=m == passes - 1):
                # past this rank's packs, a pack with its loss masked keeps every rank's collectives in step
                rows, pack = packs[m] if m < len(packs) else stand_in
                packed_tokens += pack.tokens  # what was computed, for FLOPs (rntp.tools.gpu_check's MFU)
                read_tokens += len(pack.labels)
                attention_pairs += pack.layout().pairs()
                loss, terms = pack_loss(engine.model, pack, rows, real=m < len(packs), inputs=inputs)
                engine.backward(loss * engine.info.world_size)
                stats += terms
        grad_norm = engine.step()
    policy_loss, nll, kl, plain_nll, clipped, weights, corrected = all_reduce_sum(
        (stats / torch.tensor([g.epochs] * 4 + [1.0] * 3)).tolist())
    passed = max(inputs.tokens * g.epochs, 1)  # thought tokens over all passes
    out = {"loss/policy": policy_loss, "loss/nll": nll, "loss/clip_frac": clipped / passed,
           "optim/grad_norm": grad_norm, "update/packed_tokens": packed_tokens, "update/read_tokens": read_tokens,
           "update/attention_pairs": attention_pairs}
    if inputs.behaviour is not None:
        out.update({"mismatch/is_weight_mean": weights / passed, "mismatch/corrected_frac": corrected / passed})
    if g.kl_coef > 0:
        out["loss/kl"] = kl
    if g.no_think_nll_coef > 0:
        out["loss/no_think_nll"] = plain_nll
    return out


@dataclass(kw_only=True)
class UpdateInputs:
    """What every micro-pass of one update reads: scoring's values compacted to [thought, token] (the first
    n_sampled columns), the advantages, and the global (all-rank) counts the losses are normalised by."""

    cfg: Config
    ref: torch.nn.Module | None
    device: torch.device
    advantages: torch.Tensor
    keep: torch.Tensor
    old_logp: torch.Tensor
    behaviour: torch.Tensor | None  # the sampler's log-probs: the mismatch correction's weights
    kept_positions: list[int]
    width: int  # the longest thought
    horizon: int
    norm: grpo.LossNorm
    tokens: float  # kept thought tokens, all ranks
    target_tokens: float
    plain_tokens: float

    @classmethod
    def of(cls, engine: Engine, *, ref, rollouts, targets, scored: Scored, advantages, keep, cfg) -> "UpdateInputs":
        horizon = len(targets[0])
        n_sampled = torch.tensor([r.n_sampled for r in rollouts])
        kept_positions = sorted({r.group for r, k in zip(rollouts, keep.tolist()) if k})
        seqs, tokens, target_tokens, plain_tokens = all_reduce_sum([
            float(keep.sum()), float(n_sampled[keep].sum()), float(keep.sum()) * horizon,
            float(len(kept_positions)) * horizon])
        width = max(1, int(n_sampled.max()))
        norm = grpo.LossNorm(cfg.grpo.loss_aggregation, int(seqs), int(tokens), cfg.rollout.max_thought_tokens)
        mask = scored.batch.thought_mask
        behaviour = compact(scored.behaviour_logprobs, mask, width) if scored.behaviour_logprobs is not None else None
        return cls(cfg=cfg, ref=ref, device=engine.info.device, advantages=advantages, keep=keep,
                   old_logp=compact(scored.thought_logprobs, mask, width), behaviour=behaviour,
                   kept_positions=kept_positions, width=width, horizon=horizon,
                   norm=norm, tokens=tokens, target_tokens=target_tokens, plain_tokens=plain_tokens)


def pack_loss(model, pack, rows: list[int], *, real: bool, inputs: UpdateInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-pass's loss on one pack (`real=False`: the stand-in pack, its loss masked) and its seven
    logged terms: policy loss, nll, kl, no-think nll, clipped tokens, IS weights, corrected tokens."""
    x, g, cfg = inputs, inputs.cfg.grpo, inputs.cfg
    device, width = x.device, x.width
    sampling = dict(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, autocast=cfg.model.autocast_bf16,
                    attention=cfg.train.attention)
    terms = torch.zeros(7, dtype=torch.float64)
    live = x.keep[rows] & real
    out = packed_logprobs(model, pack, **sampling)
    logp, thought_mask = per_row(out.logp, [pack.thoughts[i] for i in rows], width)
    target_logp, _ = per_row(out.logp, [pack.targets[i] for i in rows], x.horizon)
    thought_mask = thought_mask & live[:, None].to(device)
    mask = thought_mask.float()
    old = logp.detach() if g.epochs == 1 else x.old_logp[rows].to(device)
    tok_loss, clipped = grpo.clipped_surrogate(logp, old, x.advantages[rows].to(device), g.clip_low, g.clip_high)
    if x.behaviour is not None:
        weight, corrected = grpo.importance_weights(old - x.behaviour[rows].to(device), thought_mask,
                                                    g.mismatch_correction, g.is_cap, g.is_band)
        tok_loss = tok_loss * weight
        terms[5] += float(weight.sum())
        terms[6] += float(corrected.sum())
    surrogate = grpo.aggregate(tok_loss, mask, x.norm)
    terms[0] += surrogate.item()  # logged unweighted, as the other terms are
    loss = g.pg_coef * surrogate  # grpo.pg_coef=0: the control, no policy gradient
    if x.ref is not None and g.kl_coef > 0:  # the reference under the same autocast as the policy
        with torch.no_grad():
            ref_logp, _ = per_row(packed_logprobs(x.ref, pack, **sampling).logp, [pack.thoughts[i] for i in rows],
                                  width)
        kl = grpo.aggregate(grpo.k3_kl(logp, ref_logp), mask, x.norm)
        loss = loss + g.kl_coef * kl
        terms[2] += kl.item()
    if g.nll_coef > 0:  # optional next-token loss on the true continuation after the thought
        nll = -(target_logp * live[:, None].to(device)).sum() / max(x.target_tokens, 1)
        loss = loss + g.nll_coef * nll
        terms[1] += nll.item()
    if g.no_think_nll_coef > 0:  # the same continuations without a thought, read on the trunk
        plain_logp, _ = per_row(out.logp, [pack.no_think[p] for p in sorted(pack.no_think)], x.horizon)
        plain_nll = -plain_logp.sum() * float(real) / max(x.plain_tokens, 1)
        loss = loss + g.no_think_nll_coef * plain_nll
        terms[3] += plain_nll.item()
    terms[4] += float((clipped & thought_mask).sum())
    return loss, terms


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


@dataclass(kw_only=True)
class Run:
    """What the steps share, built once by `start_run`."""

    cfg: Config
    info: DistInfo
    run_dir: Path
    tokenizer: object
    tags: ThinkTags
    pad_id: int
    token_bytes: Callable[[int], bytes]
    stream: PositionStream
    engine: Engine
    sampler: Sampler
    initial: torch.nn.Module | None  # frozen initial model: KL reference, "initial" baseline, entropy filter
    ema: torch.nn.Module | None  # the EMA teacher (reward.baseline=ema)
    baseline_model: torch.nn.Module | None  # gives the no-think score s0 when it is not the policy
    evalset: EvalSet | None
    positions_per_rank: int
    start_step: int
    config_yaml: str
    resume_dir: Path | None  # the checkpoint this run resumed from
    resume_inside: bool  # ... which lies in run_dir (then `overwrite` clears nothing)
    metrics: MetricsLogger | None = None  # rank 0
    samples_file: IO | None = None  # rank 0
    dropped_nonfinite: int = 0  # groups dropped so far (cumulative metrics)
    dropped_low_spread: int = 0
    eval_samples: list[dict] | None = None  # thoughts from the latest held-out evaluation
    queue: RolloutQueue | None = None  # batches sampled ahead (rollout.max_staleness)
    ahead: dict | None = None  # ... the finished ones a resumed checkpoint held


def train(cfg: Config) -> Path | None:
    stop = StopRequest()  # first: a SIGTERM during start-up ends the run cleanly too
    run = start_run(cfg)
    if stop.any_rank():  # asked to stop during start-up: nothing trained, nothing new to save
        log.warning("stop requested during start-up; leaving before step %d with nothing new to save",
                    run.start_step + 1)
        run.sampler.close()
        stop.restore()
        run.engine.close()
        shutdown_distributed()
        return run.resume_dir
    open_logs(run)
    if run.evalset is not None and run.start_step == 0:  # step 0: the base model, on the same held-out positions
        row = MetricsRow()
        held_out(run, row, 0)
        reduced = reduce_rows(all_gather_object(row))
        if run.info.is_main:
            run.metrics.log(0, reduced)
    run.queue.start(run.start_step + 1, done=run.ahead)  # with max_staleness: batches start sampling ahead
    bar = tqdm(range(run.start_step + 1, cfg.train.steps + 1), initial=run.start_step, total=cfg.train.steps,
               disable=not (cfg.log.progress and run.info.is_main), desc="train", dynamic_ncols=True,
               file=console.terminal)
    for step in bar:
        timer = PhaseTimer()
        with timer("sample"):  # positions and G thoughts each (sampled ahead with max_staleness)
            positions, rollouts = run.queue.take(step)                           # positions, sample
        with timer("score"):
            scored = score(run, positions, rollouts)                             # score
        rewards, baseline = reward(run, positions, rollouts, scored)              # score -> reward
        adv = advantage(run, rewards, rollouts)                                  # advantage
        with timer("update"):
            update, lr = update_step(run, positions, rollouts, scored, adv)      # update
        with timer("sync"):
            sync_diff = sync(run, step, positions, rollouts)                     # sync
        row = metrics_row(run, positions=positions, rollouts=rollouts, scored=scored, rewards=rewards,   # log
                          baseline=baseline, adv=adv, update=update, lr=lr, timer=timer, sync_diff=sync_diff)
        if run.queue.lag:
            run.queue.add_metrics(row, step, rollouts)
        if run.evalset is not None and (step % cfg.eval.every == 0 or step == cfg.train.steps):
            held_out(run, row, step)                                             # held-out evaluation
        log_step(run, step, reduce_rows(all_gather_object(row)), positions, rollouts, rewards, bar)
        stopping = stop.any_rank()
        if step == cfg.train.steps or stopping or (cfg.train.save_every and step % cfg.train.save_every == 0):
            checkpoint(run, step)
        if stopping:
            log.warning("stopped at step %d on request; resume with resume=%s", step, run.run_dir)
            break
    stop.restore()
    return finish_run(run)


def start_run(cfg: Config) -> Run:
    """Process group, checks (run folder, checkpoint, tokenizer, lengths, data: each one clear error before
    any model loads), model (sharded as the backend wants), frozen copies, engine, evaluation set,
    resumed state and sampler. Nothing is written to the run folder yet (`open_logs`)."""
    info = init_distributed()
    run_dir, resume_inside = check_run_dir(cfg, info)
    positions_per_rank = check_config(cfg, info)
    resume_dir = checkpoint_to_resume(cfg, info)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    # Tokenizer, tags and data first (each rank its own documents): bad data or lengths are one clear error
    # before any model loads (the tags are added to the tokenizer in memory here; the tagged copy of the
    # model is made below, `tagged_base`). Then the models, the engine, the evaluation set and the sampler.
    tokenizer = load_tokenizer(str(resume_dir)) if resume_dir else run_tokenizer(cfg)
    tags = ThinkTags(tokenizer, cfg.rollout.open_tag, cfg.rollout.close_tag)
    check_max_model_len(cfg, tags)
    frozen = {}  # the entropy position filter reads the initial model once positions are drawn, after it loads
    stream = PositionStream(cfg.data, tokenizer, rank=info.rank, world_size=info.world_size,
                            entropy_fn=(lambda ids: position_entropies(frozen["initial"], ids))
                            if needs_initial(cfg) else None)
    check_data_and_model(cfg, info, stream, tags)
    base_path = tagged_base(cfg, info)
    lora.check_resume(resume_dir, cfg.model.lora.enabled)
    # model.lora: a checkpoint holds the adapter alone, so the base always loads from base_path
    model_path = base_path if cfg.model.lora.enabled else str(resume_dir or base_path)
    # micro-passes per step: the update's own packing rule (`plan_packs`), so that no pack is left out
    passes = packs_per_step(positions_per_rank, cfg.rollout.group_size, cfg.train.micro_batch)
    policy, frozen["initial"], ema, sampler_model = load_models(cfg, info, base_path, model_path, resume_dir, passes)
    engine = checked_engine(policy, cfg, info, passes)
    evalset = eval_set(cfg, info, tokenizer, engine, policy, base_path, model_path) if cfg.eval.every else None
    start_step, ahead = resume_state(cfg, info, resume_dir, engine, stream, ema) if resume_dir else (0, {})
    sampler = run_sampler(cfg, tags, engine, sampler_model or policy, model_path)
    initial = frozen["initial"]
    run = Run(cfg=cfg, info=info, run_dir=run_dir, tokenizer=tokenizer, tags=tags, pad_id=pad_id_of(tokenizer),
              token_bytes=token_bytes_fn(tokenizer), stream=stream, engine=engine, sampler=sampler, initial=initial,
              ema=ema, baseline_model={"policy": None, "initial": initial, "ema": ema}[cfg.reward.baseline],
              evalset=evalset, positions_per_rank=positions_per_rank, start_step=start_step,
              config_yaml=yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), resume_dir=resume_dir,
              resume_inside=resume_inside, ahead=ahead)
    run.queue = RolloutQueue(lag=cfg.rollout.max_staleness, last=cfg.train.steps,
                             draw=lambda: run.stream.take(run.positions_per_rank),
                             sample=lambda positions, step: sample(run, positions, step), stream_state=run.stream.state)
    return run


def check_run_dir(cfg: Config, info: DistInfo) -> tuple[Path, bool]:
    """A folder holding a run is resumed or overwritten only when asked (rank 0 decides for all); the
    folder, and whether the checkpoint to resume lies in it."""
    run_dir = Path(cfg.run_dir)
    resume_inside = resumes_inside(run_dir, cfg.resume)
    problem = broadcast_object(run_dir_problem(run_dir, resume_inside, cfg.overwrite) if info.is_main else None)
    if problem:
        raise ValueError(problem)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, resume_inside


def check_config(cfg: Config, info: DistInfo) -> int:
    """An unknown reward, or positions that do not divide among the ranks, fail before any model loads;
    the positions each rank takes per step."""
    for name in reward_names(cfg.reward):
        get_reward(name)
    if cfg.train.positions_per_step % info.world_size:
        raise ValueError(f"train.positions_per_step={cfg.train.positions_per_step} must divide among "
                         f"{info.world_size} ranks")
    return cfg.train.positions_per_step // info.world_size


def checkpoint_to_resume(cfg: Config, info: DistInfo) -> Path | None:
    """`resume`'s checkpoint, verified by rank 0 (reading it once, not once per rank) for every rank."""
    if not cfg.resume:
        return None
    found = None
    if info.is_main:
        try:
            found = find_checkpoint(cfg.resume)
        except (FileNotFoundError, ValueError) as e:
            found = e
    found = broadcast_object(found)
    if isinstance(found, Exception):
        raise found
    return found


def needs_initial(cfg: Config) -> bool:
    """One frozen copy of the initial model serves the KL reference, the "initial" reward baseline and the
    entropy position filter (RPT's proxy model); it stays the initial model after a resume."""
    return cfg.grpo.kl_coef > 0 or cfg.reward.baseline == "initial" or cfg.data.position_policy == "entropy"


def check_data_and_model(cfg: Config, info: DistInfo, stream: PositionStream, tags: ThinkTags) -> None:
    """Every rank stops when one has no data; what the packed forward cannot compute for this model or
    device is named before weights load."""
    problems = [p for p in all_gather_object(stream.problem()) if p]
    if problems:
        raise ValueError(problems[0])
    reason = attention.unsupported(AutoConfig.from_pretrained(resolve_model_path(cfg.model.name_or_path),
                                                              trust_remote_code=cfg.model.trust_remote_code),
                                   kind=cfg.train.attention, device_type=info.device.type,
                                   longest_sequence=max_sequence_len(cfg, tags) + cfg.data.horizon)
    if reason:
        raise ValueError(reason)


def tagged_base(cfg: Config, info: DistInfo) -> str:
    """The base model with the think tags (`rntp.think_tokens.base_model_path`): rank 0 makes the tagged copy
    where one is needed; the others then find it (or make their own, on a node that does not share RNTP_HOME)."""
    base_path = broadcast_object(base_model_path(cfg) if info.is_main else None)
    if not Path(base_path).exists() and not info.is_main:
        base_path = base_model_path(cfg)
    return base_path


def load_models(cfg: Config, info: DistInfo, base_path: str, model_path: str, resume_dir: Path | None,
                passes: int) -> tuple:
    """The policy (sharded as it loads under FSDP2 and ZeRO-3), the frozen initial model, the EMA teacher and
    a whole copy for the transformers sampler where the weights are sharded (None where not needed). With
    LoRA the frozen models share the policy's base (`rntp.lora`): the initial model is the base with the
    adapter off, the EMA teacher an EMA of the adapter on that base."""
    lora_on = cfg.model.lora.enabled
    policy = load_trainable(model_path, cfg, info, passes, adapter=str(resume_dir) if lora_on and resume_dir else None)
    policy.train()
    initial = (lora.BaseView(policy) if lora_on else load_policy(base_path, cfg, info.device).eval()
               .requires_grad_(False)) if needs_initial(cfg) else None
    sharded = engine_class(cfg, info.world_size).shards_weights(cfg)
    ema = (lora.AdapterEMA(policy) if lora_on else make_ema(load_policy(model_path, cfg, info.device) if sharded
                                                             else policy)) if cfg.reward.baseline == "ema" else None
    # sharded weights cannot generate rank by rank: the transformers sampler gets a whole copy
    sampler_model = load_policy(model_path, cfg, info.device).eval() if cfg.rollout.sampler == "hf" and sharded \
        else None
    return policy, initial, ema, sampler_model


def checked_engine(policy, cfg: Config, info: DistInfo, passes: int) -> Engine:
    """The training engine (plain, DDP, DeepSpeed ZeRO or FSDP2) with its optimizer and schedule, after one
    small pack against plain forwards: a model the packed path gets wrong stops here."""
    engine = make_engine(policy, cfg, info, passes, cfg.train.steps)
    engine.train(False)
    check_packed_forward(engine.model, attention=cfg.train.attention, autocast=cfg.model.autocast_bf16)
    engine.train(True)
    return engine


def eval_set(cfg: Config, info: DistInfo, tokenizer, engine: Engine, policy, base_path: str,
             model_path: str) -> EvalSet:
    """Fixed held-out positions (the same on every rank), difficulty by the base model (`eval.base_model`)."""
    difficulty_path = resolve_model_path(cfg.eval.base_model) if cfg.eval.base_model else base_path
    engine.train(False)
    evalset = build_eval_set(cfg, tokenizer, (lora.BaseView(policy) if cfg.model.lora.enabled else engine.model)
                             if difficulty_path == model_path else load_policy(difficulty_path, cfg, info.device))
    engine.train(True)
    return evalset


def resume_state(cfg: Config, info: DistInfo, resume_dir: Path, engine: Engine, stream: PositionStream,
                 ema) -> tuple[int, dict]:
    """The checkpoint's trainer state into the engine, data stream, RNG and EMA teacher; its step and the
    batches it had sampled ahead."""
    state = load_trainer_state(resume_dir)
    if len(state["ranks"]) != info.world_size:
        raise ValueError(f"{resume_dir} was written by {len(state['ranks'])} ranks; resume it on as many")
    mine = state["ranks"][info.rank]
    engine.load(resume_dir, state)
    stream.load_state(mine["data"])
    set_rng_state(mine["rng"])
    ahead = mine.get("ahead") or {}
    if ahead and mine["max_staleness"] != cfg.rollout.max_staleness:
        raise ValueError(f"{resume_dir} holds batches sampled ahead with rollout.max_staleness="
                         f"{mine['max_staleness']}; resume it with the same")
    if ema is not None:
        ema.load_state_dict(state["ema"])
    log.info("resumed from %s at step %d", resume_dir, state["step"])
    return state["step"], ahead


def run_sampler(cfg: Config, tags: ThinkTags, engine: Engine, model, model_path: str):
    """vLLM in-process where installed (one engine per rank or TP group), separately started vLLM servers,
    or transformers (sampling from `model`). Servers start from the model on their disk, not this run's
    weights, and vLLM serves a LoRA run's adapter once pushed: those get the weights now."""
    lora_on = cfg.model.lora.enabled
    sampler = make_sampler(cfg.rollout.sampler, model_path, tags, policy=model, dtype=cfg.model.dtype,
                           seed=cfg.train.seed, max_model_len=max_sequence_len(cfg, tags), vllm_cfg=cfg.rollout.vllm,
                           server_cfg=cfg.rollout.server, lora_rank=cfg.model.lora.rank if lora_on else None)
    if cfg.rollout.sampler == "server" or lora_on:
        sampler.push_weights(engine.weights(cfg.dist.weight_bucket_mb))
    return sampler


def open_logs(run: Run) -> None:
    """Rank 0: clear the run folder when `overwrite` asks (after every check, before the first write),
    then config.yaml, metrics (cut back to the resumed step) and samples.jsonl (likewise)."""
    if not run.info.is_main:
        return
    cfg, run_dir = run.cfg, run.run_dir
    if cfg.overwrite and not run.resume_inside:
        clear_run(run_dir)
    (run_dir / "config.yaml").write_text(run.config_yaml)
    run.metrics = MetricsLogger(run_dir, cfg.model_dump(mode="json"), wandb_mode=cfg.log.wandb_mode,
                                project=cfg.log.wandb_project, group=cfg.log.wandb_group, resume_step=run.start_step)
    cut_jsonl(run_dir / "samples.jsonl", run.start_step)  # a crashed run's samples after its checkpoint go
    cut_jsonl(run_dir / "eval_positions.jsonl", run.start_step)  # and its held-out values
    run.samples_file = open(run_dir / "samples.jsonl", "a")


def sample(run: Run, positions: list[Position], step: int) -> list[Rollout]:
    """1. G thoughts per position, seeded by run seed, step and rank."""
    r = run.cfg.rollout
    spec = SamplingSpec(r.group_size, r.max_thought_tokens, r.temperature, r.top_p,
                        seed=(run.cfg.train.seed * 100_003 + step) * 1009 + run.info.rank, seeded=r.seed_requests)
    rollouts = run.sampler.sample([run.tags.prompt(p.context) for p in positions], spec)
    run.sampler.sleep()  # a colocated engine frees its accelerator memory for scoring and update
    return rollouts


def score(run: Run, positions: list[Position], rollouts: list[Rollout]) -> Scored:
    """2. One fused pass: the no-think score, the thoughts' old log-probs and the reward's log-probs."""
    cfg = run.cfg
    run.engine.train(False)
    scored = score_groups(run.engine.model, [p.context for p in positions], rollouts, [p.target for p in positions],
                          pad_id=run.pad_id, micro_batch=cfg.train.micro_batch, autocast=cfg.model.autocast_bf16,
                          temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                          shared=cfg.train.shared_prefix, attention=cfg.train.attention)
    run.engine.train(True)
    return scored


def reward(run: Run, positions: list[Position], rollouts: list[Rollout],
           scored: Scored) -> tuple[torch.Tensor, torch.Tensor]:
    """3. The configured reward per thought, and the no-think scores [P, H] it used (under
    `reward.baseline`: the policy's from scoring, or the initial model's or EMA teacher's)."""
    cfg = run.cfg
    if run.baseline_model is not None:
        baseline = no_think_logprobs(run.baseline_model, [p.context for p in positions], [p.target for p in positions],
                                     micro_batch=cfg.train.micro_batch, autocast=cfg.model.autocast_bf16,
                                     attention=cfg.train.attention)
    else:
        baseline = scored.no_think_logprobs
    group = torch.tensor([r.group for r in rollouts])
    inputs = RewardInputs(target_ids=scored.target_ids, target_logprobs=scored.target_logprobs,
                          no_think_logprobs=baseline[group], target_pred=scored.target_pred,
                          thought_ids=[r.thought_ids[: r.n_sampled] for r in rollouts],
                          closed=torch.tensor([r.closed for r in rollouts]), group=group,
                          token_bytes=run.token_bytes, decode=run.tokenizer.decode, options=cfg.reward)
    return apply_reward_config(cfg.reward, inputs), baseline


def advantage(run: Run, rewards: torch.Tensor, rollouts: list[Rollout]) -> grpo.Advantages:
    """4. Group-relative advantages (`grpo.advantages`); the dropped-group counts accumulate."""
    g = run.cfg.grpo
    adv = grpo.advantages(rewards, torch.tensor([r.group for r in rollouts]), scale=g.advantage_scale,
                          min_group_std=g.min_group_std, drop_negative=g.drop_negative_advantages,
                          reduce=all_reduce_sum)
    run.dropped_nonfinite += adv.dropped_nonfinite
    run.dropped_low_spread += adv.dropped_low_spread
    return adv


def update_step(run: Run, positions: list[Position], rollouts: list[Rollout], scored: Scored,
                adv: grpo.Advantages) -> tuple[dict, float]:
    """5. The policy update on the thought tokens (skipped when no rank kept a group), then the
    schedule; its metrics and the learning rate it used."""
    update = update_policy(run.engine, ref=run.initial, contexts=[p.context for p in positions], rollouts=rollouts,
                           targets=[p.target for p in positions], scored=scored, advantages=adv.values, keep=adv.keep,
                           cfg=run.cfg) if all_reduce_sum([float(adv.keep.sum())])[0] > 0 else {}
    lr = run.engine.lr()
    if update:  # the schedule follows optimizer steps: a step that kept no group leaves lr as it is
        run.engine.step_scheduler()
    return update, lr


def sync(run: Run, step: int, positions: list[Position], rollouts: list[Rollout]) -> float | None:
    """6. New weights to the sampler (and the EMA teacher), in buckets gathered from any shards;
    every `rollout.check_sync_every` steps, the sampler/trainer log-prob gap after the push."""
    cfg = run.cfg
    weights = run.engine.weights(cfg.dist.weight_bucket_mb)
    if run.ema is not None:  # the EMA teacher follows the policy slowly (RLP), from the same gather
        weights = weights.tap(partial(follow, run.ema, 1 - cfg.reward.ema_decay))
    run.queue.drain()  # batches sampled ahead finish on the old weights: a push never races a request,
    barrier()  # ... of any rank: servers are shared, and vLLM updates weights under running requests
    run.sampler.push_weights(weights)
    gap = None
    if cfg.rollout.check_sync_every and step % cfg.rollout.check_sync_every == 0 and \
            hasattr(run.sampler, "prompt_logprobs"):
        gap = sampler_sync_error(run.sampler, run.engine, rollouts[0], positions[rollouts[0].group].target)
    run.queue.after_push()  # with max_staleness: the batch these weights sample starts now
    return gap


def metrics_row(run: Run, *, positions: list[Position], rollouts: list[Rollout], scored: Scored, rewards: torch.Tensor,
                baseline: torch.Tensor, adv: grpo.Advantages, update: dict, lr: float, timer: PhaseTimer,
                sync_diff: float | None) -> MetricsRow:
    """7. This rank's metrics for the step (see docs/metrics.md), each with its reduction
    across ranks."""
    cfg, H = run.cfg, run.cfg.data.horizon
    group = torch.tensor([r.group for r in rollouts])
    keep = adv.keep
    with_think = scored.target_logprobs.sum(-1) / H
    without = scored.no_think_logprobs[group].sum(-1) / H
    thought_len = torch.tensor([float(r.n_sampled) for r in rollouts])
    open_len = len(run.tags.open_ids)  # the open tag is several tokens with most tokenizers
    scored_tokens = sum(p.p + H for p in positions) + sum(open_len + len(r.thought_ids) + H for r in rollouts)
    # the tokens of the kept sequences as if unshared, so that shared and unshared rates compare
    update_tokens = int(scored.batch.attention_mask[keep].sum()) * cfg.grpo.epochs
    finite = rewards[torch.isfinite(rewards)]
    row = MetricsRow()
    row.add({
        "reward/mean": finite.mean().item() if finite.numel() else None,
        "reward/std": finite.std().item() if finite.numel() > 1 else None,
        "score/with_think": with_think.mean().item(),
        "score/no_think": without.mean().item(),
        "info_gain": (with_think - without).mean().item(),
        "groups/zero_spread_frac": grpo.zero_spread_fraction(rewards[keep], group[keep]) if keep.any() else None,
    })
    row.add({"groups/dropped_nonfinite": run.dropped_nonfinite, "groups/dropped_low_spread": run.dropped_low_spread},
            "sum")
    if run.baseline_model is not None:
        row.add({"score/baseline": (baseline[group].sum(-1) / H).mean().item()})
    row.add({
        "thought/len_mean": thought_len.mean().item(),
        "thought/truncated_frac": 1.0 - torch.tensor([r.closed for r in rollouts]).float().mean().item(),
        "policy/entropy": scored.thought_entropy.mean().item(),
        "optim/lr": lr,
        **update,  # loss/*, optim/grad_norm, mismatch/{is_weight_mean,corrected_frac}: already over all ranks
    })
    row.add({**{f"time/{k}": v for k, v in timer.seconds.items()}, "time/step": sum(timer.seconds.values())}, "max")
    row.add({
        "tokens_per_s/sample": int(thought_len.sum()) / timer.seconds["sample"],
        "tokens_per_s/score": scored_tokens / timer.seconds["score"],
        "tokens_per_s/update": update_tokens / timer.seconds["update"],
    }, "sum")
    row.add({"memory/peak_gb": peak_memory_gb()}, "max")
    row.add({f"data/{k}": v for k, v in run.stream.stats.items()}, "sum")
    if sync_diff is not None:
        row.add({"sync/max_logprob_diff": sync_diff}, "max")
    if scored.behaviour_logprobs is not None:
        mismatch = grpo.mismatch_stats(scored.thought_logprobs, scored.behaviour_logprobs, scored.batch.thought_mask)
        if mismatch:
            row.add({"mismatch/mean_abs_log_ratio": mismatch["mean_abs_log_ratio"],
                     "mismatch/kl_k3": mismatch["kl_k3"]})
            row.add({"mismatch/max_abs_log_ratio": mismatch["max_abs_log_ratio"]}, "max")
    return row


def held_out(run: Run, row: MetricsRow, step: int) -> None:
    """The policy on the fixed held-out positions (`rntp.experiments.evaluate`), into `row` as eval/*; rank 0 appends
    the values at every position to eval_positions.jsonl (for `rntp compare`'s paired intervals)."""
    timer = PhaseTimer()
    run.queue.drain()  # one client at a time on the samplers
    with timer("eval"):
        result = evaluate_policy(run.engine.model, run.sampler, run.tags, run.evalset, run.cfg, progress=False)
    row.add({f"eval/{k}": v for k, v in result["metrics"].items()})
    if run.info.is_main:
        with open(run.run_dir / "eval_positions.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **result["per_position"]}) + "\n")
        m = result["metrics"]  # one line per evaluation on the console (this rank's positions)
        console.say(f"held-out, step {step}: information gain {m['info_gain']:+.3f} nats/token (empty thought "
                    f"{m['info_gain_empty']:+.3f}, words {m['info_gain_content']:+.3f}), no-think NLL "
                    f"{m['nll_no_think']:.3f}, thought length {m['thought_len_mean']:.1f}")
    row.add({"time/eval": timer.seconds["eval"]}, "max")
    run.eval_samples = result["samples"]  # the latest thoughts on held-out text, for the report


def log_step(run: Run, step: int, row: dict, positions: list[Position], rollouts: list[Rollout],
             rewards: torch.Tensor, bar: tqdm) -> None:
    """Rank 0: the reduced row to metrics.jsonl and wandb, a few thoughts to samples.jsonl, the bar."""
    if not run.info.is_main:
        return
    run.metrics.log(step, row)
    for r, value in list(zip(rollouts, rewards.tolist()))[: run.cfg.log.sample_thoughts]:
        pos = positions[r.group]
        run.samples_file.write(json.dumps({
            "step": step, "reward": value, "context_tail": run.tokenizer.decode(pos.context[-48:]),
            "thought": run.tokenizer.decode(r.thought_ids), "target": run.tokenizer.decode(pos.target),
        }, ensure_ascii=False) + "\n")
    run.samples_file.flush()
    bar.set_postfix(reward=f"{row['reward/mean'] or float('nan'):.2f}", gain=f"{row['info_gain']:+.3f}",
                    tok_s=f"{row['tokens_per_s/sample']:.0f}")


def checkpoint(run: Run, step: int) -> None:
    """Every rank: the model, optimizer, each rank's data cursor and RNG, the EMA teacher."""
    cursor, ahead = run.queue.state()  # the data cursor and batches sampled ahead (max_staleness)
    rank_state = {"data": cursor, "rng": rng_state(), "ahead": ahead, "max_staleness": run.queue.lag}
    common = {"ema": run.ema.state_dict()} if run.ema is not None else {}
    save_checkpoint(run.run_dir, step, run.engine, run.tokenizer, rank_state, common, run.config_yaml)


def finish_run(run: Run) -> Path:
    """Close the sampler and logs, print where things are, leave the process group; the last checkpoint."""
    run.queue.close()
    run.sampler.close()
    final = find_checkpoint(run.run_dir, checksums=False)  # just written and verified by size; no re-hash
    if run.info.is_main:
        run.samples_file.close()
        plot = run.metrics.plot() if run.cfg.log.plot else None
        run.metrics.finish()
        report = held_out_report(run.metrics.rows, run.eval_samples, run.cfg.eval.bucket_by)
        write_card(final, final, adapter=run.cfg.model.lora.enabled)  # README.md: what the checkpoint is, its scores
        if report:
            (run.run_dir / "heldout.md").write_text(report)
            console.say("\n" + report.split("\n\n## ")[0] + "\n")  # the before/after table; the file: the curve too
        console.say(f"checkpoint: {final}\nmetrics:    {run.metrics.path}\nsamples:    {run.run_dir / 'samples.jsonl'}"
              + (f"\nheld-out:   {run.run_dir / 'heldout.md'}" if report else "")
              + (f"\nplot:       {plot}" if plot else ""))
    run.engine.close()
    shutdown_distributed()
    return final
