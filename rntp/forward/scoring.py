"""Teacher-forced scoring of the true continuation after each thought.

Convention used everywhere: for ids of length L, `logp[:, t]` is log p(ids[t+1] | ids[:t+1]),
so arrays over predicted tokens have length L-1 and masks are aligned with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from rntp.forward.packing import build_packs, packed_logprobs
from rollout.spans import Rollout, left_pad


@dataclass
class SequenceBatch:
    """Left-padded sequences [prompt][thought][target] with masks over predicted tokens.

    Left padding puts every row's thought and target in the last columns, so a forward
    needs logits (the costly vocabulary projection) only for that tail: see `tail`.
    """

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    thought_mask: torch.Tensor  # [B, L-1] policy-sampled thought tokens (these get policy gradient)
    target_mask: torch.Tensor  # [B, L-1] the H true-continuation tokens

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tail(self) -> int:
        """How many predicted-token columns, counted from the end, hold any thought or target."""
        used = (self.thought_mask | self.target_mask).any(0).nonzero()
        return int(self.thought_mask.shape[1] - used.min()) if used.numel() else 1


def build_batch(rollouts: list[Rollout], targets: list[list[int]], pad_id: int) -> SequenceBatch:
    """Concatenate ids exactly as sampled: prompt + thought + target, no re-tokenization."""
    seqs = [r.prompt_ids + r.thought_ids + t for r, t in zip(rollouts, targets)]
    ids, attn = left_pad(seqs, pad_id)
    width = ids.shape[1]
    thought = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    target = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for i, (r, t, s) in enumerate(zip(rollouts, targets, seqs)):
        pad = width - len(s)
        start = pad + len(r.prompt_ids)  # column of the first thought token
        thought[i, start - 1 : start - 1 + r.n_sampled] = True
        t0 = start + len(r.thought_ids)
        target[i, t0 - 1 : t0 - 1 + len(t)] = True
    return SequenceBatch(ids, attn, thought, target)


def token_logprobs(model, input_ids, attention_mask, *, tail: int | None = None, with_logits: bool = False):
    """log p of each next token for the last `tail` predicted tokens, [B, tail] (all L-1 when
    tail is None); optionally the matching logits. Positions come from the attention mask,
    so left padding does not shift them."""
    tail = input_ids.shape[1] - 1 if tail is None else tail
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   logits_to_keep=tail + 1, use_cache=False).logits[:, :-1]
    logp = selective_log_softmax(logits, input_ids[:, -tail:])
    return (logp, logits) if with_logits else logp


@dataclass
class Scored:
    """Per-thought results of fused scoring (all on CPU, float32), aligned with `batch`."""

    thought_logprobs: torch.Tensor  # [N, L-1] old log-probs, zero outside thought_mask
    target_ids: torch.Tensor  # [N, H]
    target_logprobs: torch.Tensor  # [N, H] log p(target_h | prompt, thought, target_<h)
    target_pred: torch.Tensor  # [N, H] argmax prediction at each target token (teacher-forced)
    thought_entropy: torch.Tensor  # [N] mean next-token entropy over the sampled thought tokens
    batch: SequenceBatch
    no_think_logprobs: torch.Tensor  # [P, H] log p(target_h | context, target_<h), one row per position
    no_think_greedy: torch.Tensor  # [P, H] bool: greedy prediction without a thought is right
    # [N, L-1] the sampler's log-probs of the thought tokens (zero elsewhere); None if a sampler gave none
    behaviour_logprobs: torch.Tensor | None = None

    @property
    def target_greedy(self) -> torch.Tensor:
        return self.target_pred == self.target_ids


@torch.no_grad()
def no_think_logprobs(model, contexts: list[list[int]], targets: list[list[int]], *, micro_batch: int,
                      autocast: bool = False, attention: str = "blocks") -> torch.Tensor:
    """log p(target_h | context, target_<h) per position, [P, H] (for a baseline model), read from
    the same packs as scoring's own no-think scores (a chunk's positions share its trunk)."""
    out = torch.zeros(len(contexts), len(targets[0]))
    for _, pack in build_packs(contexts, [], targets, micro_batch=micro_batch, no_think=True,
                               positions=list(range(len(contexts)))):
        logp = packed_logprobs(model, pack, autocast=autocast, attention=attention).logp.float().cpu()
        for g, span in pack.no_think.items():
            out[g] = logp[span]
    return out


@torch.no_grad()
def position_entropies(model, ids: list[int]) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at every position of one sequence, [len(ids)]:
    entry p is the entropy of the prediction of ids[p] from ids[:p]; entry 0 is NaN."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, :-1].float()
    return torch.cat([torch.tensor([float("nan")]), entropy_from_logits(logits).cpu()])


@torch.no_grad()
def score_groups(model, contexts: list[list[int]], rollouts: list[Rollout], targets: list[list[int]], *, pad_id: int,
                 micro_batch: int, autocast: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 shared: bool = True, attention: str = "blocks") -> Scored:
    """Fused scoring of all thoughts: per position, the no-think target log-probs; per thought, the
    old log-probs of its tokens and the log-probs of the target after it (the reward), all from
    one forward of shared-prefix packs (`rntp.forward.packing`): each chunk's tokens once, every thought
    branch attending to its context. At most `micro_batch` thoughts go into a pack (`plan_packs`).
    `rollouts[i].group` indexes `contexts` and `targets`. Thought log-probs (and their entropy) are
    those of the sampling distribution (`temperature`, `top_p`); target log-probs are the model's.
    """
    horizon = len(targets[0])
    if any(len(t) != horizon for t in targets):
        raise ValueError("all targets in a batch must have the same horizon")
    batch = build_batch(rollouts, [targets[r.group] for r in rollouts], pad_id)
    n = len(rollouts)
    thought_lp = torch.zeros(batch.thought_mask.shape)
    target_lp, pred = torch.zeros(n, horizon), torch.zeros(n, horizon, dtype=torch.long)
    entropy, no_think = torch.zeros(n), torch.zeros(len(contexts), horizon)
    no_think_greedy = torch.zeros(len(contexts), horizon, dtype=torch.bool)
    for _, pack in build_packs(contexts, rollouts, targets, micro_batch=micro_batch, shared=shared, no_think=True):
        out = packed_logprobs(model, pack, temperature=temperature, top_p=top_p, autocast=autocast, extras=True,
                              attention=attention)
        logp, argmax, ent = out.logp.float().cpu(), out.argmax.cpu(), out.entropy.cpu()
        for i, span in pack.thoughts.items():
            thought_lp[i, batch.thought_mask[i]] = logp[span]
            if rollouts[i].n_sampled:
                entropy[i] = ent[span].mean()
        for i, span in pack.targets.items():
            target_lp[i], pred[i] = logp[span], argmax[span]
        for g, span in pack.no_think.items():
            no_think[g], no_think_greedy[g] = logp[span], argmax[span] == torch.tensor(targets[g])
    target_ids = torch.tensor([targets[r.group] for r in rollouts])
    behaviour = None
    if all(r.behaviour_logprobs is not None for r in rollouts):
        behaviour = torch.zeros(batch.thought_mask.shape)
        for i, r in enumerate(rollouts):
            behaviour[i, batch.thought_mask[i]] = torch.tensor(r.behaviour_logprobs, dtype=torch.float32)
    return Scored(thought_lp, target_ids, target_lp, pred, entropy, batch, no_think, no_think_greedy, behaviour)


@torch.no_grad()
def next_token_difficulty(model, contexts: list[list[int]], pad_id: int, micro_batch: int,
                          true_next: list[int] | None = None) -> torch.Tensor:
    """How hard the next token is after each context, [P] nats: the entropy of the model's next-token
    distribution, or, given the true next tokens, minus their log-probs."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(contexts), micro_batch):
        ids, attn = left_pad(contexts[s : s + micro_batch], pad_id)
        ids, attn = ids.to(device), attn.to(device)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=1, use_cache=False).logits[:, -1].float()
        if true_next is None:
            out.append(entropy_from_logits(logits).cpu())
        else:
            true = torch.tensor(true_next[s : s + micro_batch], device=device)
            out.append(-torch.log_softmax(logits, -1).gather(-1, true[:, None])[:, 0].cpu())
    return torch.cat(out)


def next_token_entropy(model, contexts: list[list[int]], pad_id: int, micro_batch: int) -> torch.Tensor:
    """Entropy (nats) of the model's next-token distribution after each context, [P]."""
    return next_token_difficulty(model, contexts, pad_id, micro_batch)
