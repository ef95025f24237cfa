"""Teacher-forced scoring of the true continuation after each thought.

Convention used everywhere: for ids of length L, `logp[:, t]` is log p(ids[t+1] | ids[:t+1]),
so arrays over predicted tokens have length L-1 and masks are aligned with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from rollout.spans import Rollout


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

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.attention_mask, self.thought_mask, self.target_mask

    def rows(self, index) -> "SequenceBatch":
        return SequenceBatch(*(t[index] for t in self.tensors()))

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
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    thought = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    target = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for i, (r, t, s) in enumerate(zip(rollouts, targets, seqs)):
        pad = width - len(s)
        ids[i, pad:] = torch.tensor(s)
        attn[i, pad:] = 1
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
    """Per-sequence results of the fused scoring forward (all on CPU, float32)."""

    thought_logprobs: torch.Tensor  # [N, L-1] old log-probs, zero outside thought_mask
    target_logprobs: torch.Tensor  # [N, H] log p(target_h | prompt, thought, target_<h)
    target_greedy: torch.Tensor  # [N, H] bool: argmax prediction equals the true token
    thought_entropy: torch.Tensor  # [N] mean next-token entropy over the sampled thought tokens
    batch: SequenceBatch


def _pick(values: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of `values` at `mask`, packed left into [B, width] (every row has `width` picks)."""
    return values[mask].view(values.shape[0], width)


@torch.no_grad()
def score_rollouts(model, rollouts: list[Rollout], targets: list[list[int]], pad_id: int,
                   micro_batch: int, autocast: bool = False) -> Scored:
    """One no-grad forward per micro-batch gives both the old log-probs of the thought
    tokens and the log-probs of the true continuation after the thought (the reward)."""
    horizon = len(targets[0])
    if any(len(t) != horizon for t in targets):
        raise ValueError("all targets in a batch must have the same horizon")
    batch = build_batch(rollouts, targets, pad_id)
    device = next(model.parameters()).device
    width = batch.input_ids.shape[1] - 1
    thought_lp = torch.zeros(batch.thought_mask.shape)
    target_lp, greedy, entropy = [], [], []
    for s in range(0, len(batch), micro_batch):
        mb = batch.rows(slice(s, s + micro_batch)).to(device)
        tail = mb.tail
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logp, logits = token_logprobs(model, mb.input_ids, mb.attention_mask, tail=tail, with_logits=True)
        logp, thought_mask, target_mask = logp.float(), mb.thought_mask[:, -tail:], mb.target_mask[:, -tail:]
        thought_lp[s : s + micro_batch, width - tail :] = (logp * thought_mask).cpu()
        target_lp.append(_pick(logp, target_mask, horizon).cpu())
        hits = logits.argmax(-1) == mb.input_ids[:, -tail:]
        greedy.append(_pick(hits, target_mask, horizon).cpu())
        # Entropy only where the policy sampled: the full-vocabulary softmax is the costly part.
        ent = torch.zeros(thought_mask.shape, device=device)
        ent[thought_mask] = entropy_from_logits(logits[thought_mask].float())
        entropy.append((ent.sum(1) / thought_mask.sum(1).clamp(min=1)).cpu())
    return Scored(thought_lp, torch.cat(target_lp), torch.cat(greedy), torch.cat(entropy), batch)


@torch.no_grad()
def no_think_scores(model, chunks: list[list[int]], positions: list[tuple[int, int]], horizon: int,
                    pad_id: int, micro_batch: int, autocast: bool = False) -> torch.Tensor:
    """Per-token log p(target | context) with no thought, [P, H].

    Causality lets one forward over a chunk serve every position in it, so this costs one
    forward per chunk, not one per thought. `positions` holds (chunk index, p) pairs.
    """
    device = next(model.parameters()).device
    ends = [0] * len(chunks)  # only the prefix up to the last target is needed
    for c, p in positions:
        ends[c] = max(ends[c], p + horizon)
    chunk_logp: list[torch.Tensor] = []
    for s in range(0, len(chunks), micro_batch):
        part = [chunks[c][: ends[c]] for c in range(s, min(s + micro_batch, len(chunks)))]
        width = max(map(len, part))
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, seq in enumerate(part):
            ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
        # Right padding here; logits are needed only from the earliest target onwards.
        first = min(p for c, p in positions if s <= c < s + micro_batch) - 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logp = token_logprobs(model, ids.to(device), attn.to(device), tail=width - 1 - first)
        chunk_logp.extend(torch.nn.functional.pad(logp.float().cpu(), (first, 0)))
    # Token p is predicted at shifted index p-1.
    return torch.stack([chunk_logp[c][p - 1 : p - 1 + horizon] for c, p in positions])
