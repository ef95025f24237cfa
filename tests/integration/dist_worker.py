"""Run under torchrun by the distributed tests (or directly for a world of one).

`step`: one optimizer step on a fixed global batch of 4 groups x 4 thoughts; each rank takes the
groups g with g % world == rank. Rank 0 saves the full parameters after the step.
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
    from rewards import score_groups
    from rntp import grpo
    from rntp.config import load_config
    from rntp.distributed import Engine, init_distributed, shutdown_distributed
    from rntp.train import load_policy, update_policy
    from rollout import Rollout

    info = init_distributed()
    cfg = load_config(None, [f"model.name_or_path={args.model}", f"dist.backend={args.backend}",
                             f"dist.zero_stage={args.zero}", "train.micro_batch=3", "rollout.group_size=4",
                             "rollout.max_thought_tokens=6", "optim.lr=1e-3", "optim.eps=1e-6",
                             f"grpo.loss_aggregation={args.aggregation}", "train.positions_per_step=4"])
    policy = load_policy(args.model, cfg, info.device)
    contexts, rollouts, targets, rewards = fixed_global_batch(policy.config.vocab_size)
    mine = [g for g in range(4) if g % info.world_size == info.rank]
    local = {g: i for i, g in enumerate(mine)}
    my_rollouts = [Rollout(local[r.group], r.prompt_ids, r.thought_ids, r.n_sampled, r.closed)
                   for r in rollouts if r.group in local]
    my_rewards = torch.stack([rewards[i] for i, r in enumerate(rollouts) if r.group in local])
    policy.eval()
    scored = score_groups(policy, [contexts[g] for g in mine], my_rollouts, [targets[g] for g in mine], 0, 3)
    policy.train()
    group = torch.tensor([r.group for r in my_rollouts])
    advantages = grpo.group_advantages(my_rewards, group, "group")
    passes = -(-len(my_rollouts) // 3)
    engine = Engine(policy, cfg, info, passes, total_steps=1)
    keep = torch.ones(len(my_rollouts), dtype=torch.bool)
    stats = update_policy(engine, None, scored.batch, scored.thought_logprobs, advantages, keep, cfg,
                          passes if info.world_size > 1 or args.backend == "deepspeed" else None)
    state = engine.full_state_dict()
    if info.rank == 0:
        torch.save({"state": state, "stats": stats}, args.out)
    shutdown_distributed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["step"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", default="none")
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--aggregation", default="seq_mean")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.exit(step(args))
