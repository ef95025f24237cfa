"""Run under torchrun by the distributed tests (or directly for a world of one).

`step`: one optimizer step on a fixed global batch of 4 groups x 4 thoughts; each rank takes the
groups g with g % world == rank. Rank 0 saves the full parameters after the step (with `--lora`, a
LoRA adapter on the frozen base: the adapter's parameters).
`load`: the most parameter elements a rank holds while the policy loads and is consolidated.
`ends`: many short runs in one process, each ending as a training run ends (engine closed, group
destroyed), to catch a hang or abort at the end of a run.
`collectives`: RNTP's metric and object collectives where someone else made the default group for CUDA
tensors alone (as vLLM does on a GPU), emulated by "cuda:gloo".
`push`: two ranks sampling ahead (max_staleness 1) from one `rntp serve` at `--url`, rank 1's requests
slow, then the loop's weight push (`rntp.train.sync`): when each rank's requests ended and when rank 0's
transfer began.
"""

import argparse
import sys

import torch


def fixed_global_batch(vocab: int):
    from rollout import Rollout

    gen = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(100, vocab, (n,), generator=gen).tolist()  # noqa: E731
    contexts = [rand(10 + 3 * g) for g in range(4)]
    targets = [rand(4) for _ in range(4)]
    rollouts = []
    for g in range(4):
        for j in range(4):
            n = 2 + (g + j) % 4
            rollouts.append(Rollout(g, contexts[g] + [44, 17400, 46], rand(n) + [9617, 17400, 46], n, False))
    rewards = torch.randn(16, generator=gen)
    return contexts, rollouts, targets, rewards


def step(args):
    from rntp.forward.scoring import score_groups
    from rntp import grpo
    from rntp.distributed import init_distributed, shutdown_distributed
    from rntp.engines import make_engine
    from rntp.models import load_trainable
    from rntp.forward.packing import packs_per_step
    from rntp.train import update_policy
    from rollout import Rollout

    info = init_distributed()
    cfg = worker_config(args)
    passes = packs_per_step(4 // info.world_size, 4, 3)  # this rank's 4 or 2 groups of 4, micro-batches of 3
    torch.manual_seed(0)  # a LoRA adapter's initial lora_A, the same in every process
    policy = load_trainable(args.model, cfg, info, passes)  # sharded as it loads (FSDP2, ZeRO-3)
    if args.lora:  # lora_B starts at zero, which would leave lora_A's gradient zero: give it a start
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    engine = make_engine(policy, cfg, info, passes, total_steps=1)
    contexts, rollouts, targets, rewards = fixed_global_batch(policy.config.vocab_size)
    mine = [g for g in range(4) if g % info.world_size == info.rank]
    local = {g: i for i, g in enumerate(mine)}
    my_rollouts = [Rollout(local[r.group], r.prompt_ids, r.thought_ids, r.n_sampled, r.closed)
                   for r in rollouts if r.group in local]
    my_rewards = torch.stack([rewards[i] for i, r in enumerate(rollouts) if r.group in local])
    engine.train(False)
    scored = score_groups(engine.model, [contexts[g] for g in mine], my_rollouts, [targets[g] for g in mine], pad_id=0,
                          micro_batch=3)
    engine.train(True)
    group = torch.tensor([r.group for r in my_rollouts])
    advantages = grpo.group_advantages(my_rewards, group, "group")
    keep = torch.ones(len(my_rollouts), dtype=torch.bool)
    # every rank runs the same number of passes where ranks (or DeepSpeed's accumulation) need it
    assert engine.fixed_passes == (passes if info.world_size > 1 or args.backend == "deepspeed" else None)
    reduced = count_all_reduces(engine) if args.count_all_reduces else None
    stats = update_policy(engine, ref=None, contexts=[contexts[g] for g in mine], rollouts=my_rollouts,
                          targets=[targets[g] for g in mine], scored=scored, advantages=advantages, keep=keep, cfg=cfg)
    state = engine.full_state_dict()
    if info.rank == 0:
        torch.save({"state": state, "stats": stats, "passes": passes, "reduced": reduced}, args.out)
    engine.close()
    shutdown_distributed()


def count_all_reduces(engine) -> list[int]:
    """Record, for every bucket DDP all-reduces, the backward pass (counted from 0) it reduces in: a
    comm hook doing what DDP does by default (allreduce_hook) and a count of `engine.backward` calls."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    reduced, passes, backward = [], [-1], engine.backward

    def counted_backward(loss):
        passes[0] += 1
        backward(loss)

    def hook(state, bucket):
        reduced.append(passes[0])
        return allreduce_hook(state, bucket)

    engine.model.register_comm_hook(None, hook)
    engine.backward = counted_backward
    return reduced


def worker_config(args):
    from rntp.config import load_config

    return load_config(None, [f"model.name_or_path={args.model}", f"dist.backend={args.backend}",
                              f"dist.zero_stage={args.zero}", "train.micro_batch=3", "rollout.group_size=4",
                              "rollout.max_thought_tokens=6", "optim.lr=1e-3", "optim.eps=1e-6",
                              f"grpo.loss_aggregation={args.aggregation}", "train.positions_per_step=4",
                              *(["model.lora.enabled=true", "model.lora.rank=4"] if args.lora else [])])


def held_elements(params) -> int:
    """Parameter elements this process holds in memory now: a DTensor's local shard, a ZeRO-3
    partition (and any gathered copy), a plain tensor whole; nothing on the meta device."""
    held, seen = 0, set()
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        local = p._local_tensor if hasattr(p, "_local_tensor") else p.data
        if local.device.type != "meta":
            held += local.numel()
        if hasattr(p, "ds_tensor"):
            held += p.ds_tensor.numel()
    return held


def load(args):
    """Load the policy to train and write the checkpoint's consolidated weights, recording the most
    parameter elements this rank held at once (sampled at every parameter a module registers)."""
    import json
    import weakref

    from torch.nn.modules.module import register_module_parameter_registration_hook

    from rntp.distributed import init_distributed, shutdown_distributed
    from rntp.engines import make_engine
    from rntp.models import load_trainable

    info = init_distributed()
    cfg = worker_config(args)
    params, peak = {}, [0]  # id -> weak reference: replaced parameters drop out as they are freed

    def sample(module=None, name=None, param=None):
        if param is not None:
            params[id(param)] = weakref.ref(param)
        live = [p for p in (ref() for ref in params.values()) if p is not None]
        peak[0] = max(peak[0], held_elements(live))

    hook = register_module_parameter_registration_hook(sample)
    engine = make_engine(load_trainable(args.model, cfg, info, 2), cfg, info, 2, total_steps=1)
    hook.remove()
    for p in engine.raw.parameters():
        sample(param=p)
    state = engine.full_state_dict()  # a checkpoint's consolidation
    with open(f"{args.out}.rank{info.rank}.json", "w") as f:
        json.dump({"peak_held": peak[0], "held_after": held_elements(list(engine.raw.parameters())),
                   "consolidated": sum(t.numel() for t in state.values())}, f)
    if info.rank == 0:
        torch.save(state, args.out)
    engine.close()
    shutdown_distributed()


def ends(args):
    """`args.rounds` times: a process group, the backend's engine, one optimizer step, and the end of a
    run as `rntp.train.finish_run` does it. A round that hangs fails the test by its timeout."""
    import os

    import torch.distributed as dist

    from rntp.distributed import DistInfo, all_gather_object, broadcast_object, shutdown_distributed
    from rntp.engines import make_engine
    from rntp.models import load_trainable

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 1, world, rank == 0)
    cfg = worker_config(args)
    info = DistInfo(rank, world)
    for round_ in range(args.rounds):
        dist.init_process_group("gloo", store=dist.PrefixStore(f"round{round_}", store), rank=rank, world_size=world)
        engine = make_engine(load_trainable(args.model, cfg, info, 1), cfg, info, 1, total_steps=1)
        ids = torch.arange(8).view(1, 8)
        engine.backward(engine.model(input_ids=ids).logits.float().logsumexp(-1).mean())
        engine.step()
        all_gather_object({"rank": rank})  # a checkpoint ends with object collectives (save_checkpoint)
        broadcast_object(f"step_{round_}")
        engine.close()
        shutdown_distributed()
        del engine
    if rank == 0:
        open(args.out, "w").write(f"{args.rounds} rounds")


def collectives(args):
    import torch.distributed as dist

    from rntp.distributed import all_gather_object, all_reduce_sum, barrier, broadcast_object, init_distributed, \
        shutdown_distributed

    dist.init_process_group("cuda:gloo")  # torchrun's environment, a backend for the cuda device type only
    info = init_distributed()
    summed = all_reduce_sum([float(info.rank + 1), 0.5])
    gathered = all_gather_object({"rank": info.rank})
    sent = broadcast_object(f"from rank {info.rank}")
    barrier()
    shutdown_distributed()
    if info.rank == 0:
        open(args.out, "w").write(repr((summed, gathered, sent, dist.is_initialized())))


def push(args):
    import json
    import time
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rntp.config import load_config
    from rntp.distributed import all_gather_object, init_distributed, shutdown_distributed
    from rntp.rollout_queue import RolloutQueue
    from rntp.train import sync
    from rollout import SamplingSpec, ThinkTags, make_sampler
    from rollout.base import WeightStream

    info = init_distributed()
    cfg = load_config(None, ["rollout.sampler=server", f"rollout.server.urls=[{args.url}]", "rollout.max_staleness=1",
                             "rollout.server.weight_transfer=gloo", "rollout.check_sync_every=0"])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tags = ThinkTags(tokenizer)
    sampler = make_sampler("server", "", tags, server_cfg=cfg.rollout.server)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    prompt = tags.prompt(tokenizer.encode("The value returned by the function is", add_special_tokens=False))
    ended, pushed = [], []

    def sample(positions, step):
        if info.rank == 1:
            time.sleep(1.5)  # a slow request: a long thought, a busy server
        rollouts = sampler.sample([prompt], SamplingSpec(2, 6, seed=step))
        ended.append(time.time())
        return rollouts

    push_weights = sampler.push_weights
    sampler.push_weights = lambda weights: pushed.append(time.time()) or push_weights(weights)
    queue = RolloutQueue(lag=1, last=2, draw=lambda: [], sample=sample, stream_state=dict)
    run = SimpleNamespace(cfg=cfg, engine=SimpleNamespace(weights=lambda mb: WeightStream.of_module(model, mb)),
                          ema=None, queue=queue, sampler=sampler)
    queue.start(1)  # batches 1 and 2, in flight
    positions, rollouts = queue.take(1)
    sync(run, 1, positions, rollouts)  # batch 2 still runs on rank 1 when rank 0 is ready to push
    times = all_gather_object({"ended": ended, "pushed": pushed})
    queue.close()
    sampler.close()
    shutdown_distributed()
    if info.rank == 0:
        open(args.out, "w").write(json.dumps(times))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["step", "load", "ends", "collectives", "push"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", default="none")
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--aggregation", default="seq_mean")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--count-all-reduces", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--url")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.exit({"step": step, "load": load, "ends": ends, "collectives": collectives,
              "push": push}[args.command](args))
