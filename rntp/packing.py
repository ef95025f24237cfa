"""Shared-prefix packing: each context computed once, its thoughts attending to it, in scoring and
in the update alike.

Every group of G thoughts shares one context, and the positions of one chunk share prefixes of it.
A pack is one row: per chunk, its tokens (the trunk: the longest context, plus the targets when
no-think scores are wanted), then every branch `[open tag][thought][close tag][target]` of that
chunk's positions. A block attention mask lets each branch see the trunk before its position and
itself (causally), and its position ids continue from its position, so every branch computes what
the unshared sequence `context + branch` computes, while the context's keys and values, and their
gradient (the sum over its branches), are computed once.

Why a packed row with a mask rather than a KV cache built with gradients: it is one ordinary
forward and backward, so gradient checkpointing, DDP, ZeRO 1-3 and FSDP2 see nothing unusual. The
mask is a boolean [L, L] for SDPA (an additive one for eager attention); on GPUs SDPA runs it with
its memory-efficient kernel. With `shared=False` every thought gets its own copy of its context
(the unshared computation, for the benchmark and for debugging), through the same code.

Log-probs are read only where needed (thought tokens, targets, no-think targets), and the output
projection runs over them in chunks (`ChunkedLogProbs`): a chunk's [tokens x vocabulary] logits
live only while that chunk is computed, in backward too, so peak memory does not grow with
vocabulary size times the number of tokens read.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from trl.trainer.utils import selective_log_softmax

from rollout.spans import Rollout

LOGP_FLOOR = -1e4


def sampling_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                      top_p: float = 1.0) -> torch.Tensor:
    """log p of `ids` under the distribution the sampler draws from: logits divided by the
    temperature, then restricted to the top-p nucleus (the most likely tokens, kept while the mass
    above them is below `top_p`) and renormalised, as vLLM and transformers sample. A token outside
    the nucleus has probability 0; its log-prob is floored at LOGP_FLOOR to keep ratios finite."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        probs, order = logits.float().softmax(-1).sort(-1, descending=True)
        mass_above = probs.cumsum(-1) - probs
        outside = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, mass_above >= top_p)
        logits = logits.masked_fill(outside, float("-inf"))
        return selective_log_softmax(logits, ids).clamp(min=LOGP_FLOOR)
    return selective_log_softmax(logits, ids)



@dataclass
class Pack:
    """A micro-batch of packed rows, one per trunk (a chunk's shared context, or with `shared=False`
    one context copy per thought), and where its read-outs go. Rows are right-padded to one width;
    attention cost is then that of the rows, not of one long row holding them all."""

    rows: list[dict] = field(default_factory=list)  # ids, pos, branch (-1: trunk), limit per token
    read_row: list[int] = field(default_factory=list)  # (row, column) whose next-token log-prob is read
    read_col: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # the token read there
    sampled: list[bool] = field(default_factory=list)  # a thought token: sampling distribution
    thoughts: dict[int, slice] = field(default_factory=dict)  # rollout -> its thought tokens among the reads
    targets: dict[int, slice] = field(default_factory=dict)  # rollout -> its target tokens
    no_think: dict[int, slice] = field(default_factory=dict)  # position -> its targets read on the trunk

    @property
    def tokens(self) -> int:
        return sum(len(r["ids"]) for r in self.rows)

    def _read(self, col: int, label: int, sampled: bool = False) -> None:
        self.read_row.append(len(self.rows) - 1)
        self.read_col.append(col)
        self.labels.append(label)
        self.sampled.append(sampled)

    def add_trunk(self, tokens: list[int]) -> None:
        """A new row holding `tokens` from position 0."""
        self.rows.append({"ids": list(tokens), "pos": list(range(len(tokens))), "branch": [-1] * len(tokens),
                          "limit": [len(tokens)] * len(tokens)})

    def add_no_think(self, position: int, context_len: int, target: list[int]) -> None:
        first = len(self.labels)
        for h, token in enumerate(target):  # target h is predicted at the trunk token before it
            self._read(context_len + h - 1, token)
        self.no_think[position] = slice(first, len(self.labels))

    def add_branch(self, index: int, rollout: Rollout, context_len: int, target: list[int]) -> None:
        row = self.rows[-1]
        start = len(row["ids"])
        opened = rollout.prompt_ids[context_len:]
        tokens = opened + rollout.thought_ids + target
        row["ids"] += tokens
        row["pos"] += range(context_len, context_len + len(tokens))
        row["branch"] += [max(row["branch"]) + 1] * len(tokens)
        row["limit"] += [context_len] * len(tokens)  # it sees the trunk before its position
        first = len(self.labels)
        for j in range(rollout.n_sampled):  # thought token j is predicted at the token before it
            self._read(start + len(opened) + j - 1, rollout.thought_ids[j], sampled=True)
        self.thoughts[index] = slice(first, len(self.labels))
        t0 = start + len(opened) + len(rollout.thought_ids)
        first = len(self.labels)
        for h, token in enumerate(target):
            self._read(t0 + h - 1, token)
        self.targets[index] = slice(first, len(self.labels))

    def tensors(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ids and position ids [B, W], and the attention mask [B, W, W]: True where query q may
        attend key k. A trunk token sees the trunk before it; a branch token sees the trunk before
        its position and its own branch before it; padding sees only itself."""
        width = max(len(r["ids"]) for r in self.rows)

        def padded(key, fill):
            return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in self.rows], device=device)

        ids, pos, branch, limit = padded("ids", 0), padded("pos", 0), padded("branch", -2), padded("limit", 0)
        k = torch.arange(width, device=device)
        causal = k[None, None, :] <= k[None, :, None]
        trunk_key = (branch == -1)[:, None, :]
        sees_trunk = trunk_key & (k[None, None, :] < limit[:, :, None])
        own_branch = (branch[:, None, :] == branch[:, :, None]) & ~trunk_key
        mask = causal & (sees_trunk | own_branch)
        return ids, pos, mask | torch.eye(width, dtype=torch.bool, device=device)[None]


def build_packs(contexts: list[list[int]], rollouts: list[Rollout], targets: list[list[int]], *,
                positions_per_pack: int, shared: bool = True, no_think: bool = False,
                positions: list[int] | None = None) -> list[tuple[list[int], Pack]]:
    """Packs over `positions` (default all), `positions_per_pack` at a time, each with the rollouts of
    its positions (`rollouts[i].group` indexes `contexts` and `targets`). Consecutive positions whose
    context + target sequences are prefixes of one another (positions of one chunk) share a trunk.
    With `no_think`, the trunk holds the targets too and the positions' no-think targets are read."""
    by_position: dict[int, list[int]] = {}
    for i, r in enumerate(rollouts):
        by_position.setdefault(r.group, []).append(i)
    order = positions if positions is not None else sorted(by_position)
    packs = []
    for s in range(0, len(order), positions_per_pack):
        chosen, pack = order[s : s + positions_per_pack], Pack()
        # runs of positions whose sequences are all prefixes of the run's longest (one chunk's
        # positions, or documents that open alike); the trunk is that longest
        runs: list[list[int]] = []
        longest_seq: list[int] = []
        for g in chosen:
            seq = contexts[g] + targets[g]
            if shared and runs and _nested(seq, longest_seq):
                runs[-1].append(g)
                longest_seq = max(longest_seq, seq, key=len)
            else:
                runs.append([g])
                longest_seq = seq
        for run in runs:
            longest = max(run, key=lambda g: len(contexts[g]))
            trunk = contexts[longest] + (targets[longest] if no_think else [])
            if shared:
                pack.add_trunk(trunk)
                for g in run:
                    if no_think:
                        pack.add_no_think(g, len(contexts[g]), targets[g])
                    for i in by_position.get(g, []):
                        pack.add_branch(i, rollouts[i], len(contexts[g]), targets[g])
            else:  # every thought with its own copy of the context
                for g in run:
                    if no_think:
                        pack.add_trunk(contexts[g] + targets[g])
                        pack.add_no_think(g, len(contexts[g]), targets[g])
                    for i in by_position.get(g, []):
                        pack.add_trunk(contexts[g])
                        pack.add_branch(i, rollouts[i], len(contexts[g]), targets[g])
        packs.append(([i for g in chosen for i in by_position.get(g, [])], pack))
    return packs


def positions_per_pack(group_size: int, micro_batch: int) -> int:
    """Whole groups per pack: as many positions as `micro_batch` thoughts hold (at least one)."""
    return max(1, micro_batch // max(group_size, 1))


def packs_per_step(positions: int, group_size: int, micro_batch: int) -> int:
    """How many packs (micro-passes) `positions` positions of `group_size` thoughts make."""
    return -(-positions // positions_per_pack(group_size, micro_batch))


def largest_group(rollouts: list[Rollout]) -> int:
    counts: dict[int, int] = {}
    for r in rollouts:
        counts[r.group] = counts.get(r.group, 0) + 1
    return max(counts.values(), default=1)


def _nested(a: list[int], b: list[int]) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


class ChunkedLogProbs(torch.nn.Module):
    """Stands in for the model's output layer during a packed forward: from the hidden states it is
    given (only the read positions, via `logits_to_keep`), log p of each label, thought tokens under
    the sampling distribution (temperature, top-p), others under the model. The projection and
    log-softmax run over `chunk` tokens at a time, recomputed in backward, so no more than one
    chunk's logits exist at once. It calls the real head module, so sharded backends (ZeRO-3's
    hooks, FSDP2's unsharded root parameters) see an ordinary call of it."""

    def __init__(self, head: torch.nn.Module, where: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor,
                 sampled: torch.Tensor, temperature: float, top_p: float, extras: bool, chunk: int):
        super().__init__()
        self.head, self.where, self.chunk, self.extras = head, where, chunk, extras
        self.labels, self.sampled, self.temperature, self.top_p = labels, sampled, temperature, top_p
        self.argmax = self.entropy = None

    def _logp(self, hidden: torch.Tensor, labels: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
        return self._from_logits(_at_least_fp32(self.head(hidden)), labels, sampled)

    def _from_logits(self, logits: torch.Tensor, labels: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
        plain = torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]
        if (self.temperature == 1.0 and self.top_p == 1.0) or not sampled.any():
            return plain
        return torch.where(sampled, sampling_logprobs(logits, labels, self.temperature, self.top_p), plain)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden[self.where]  # [reads, D]: only where a log-prob is read
        out, argmax, entropy = [], [], []
        for s in range(0, hidden.shape[0], self.chunk):
            part = slice(s, s + self.chunk)
            if torch.is_grad_enabled():  # recomputed in backward: one chunk's logits at a time
                out.append(checkpoint(self._logp, hidden[part], self.labels[part], self.sampled[part],
                                      use_reentrant=False))
                continue
            logits = _at_least_fp32(self.head(hidden[part]))  # scoring: one projection serves all reads
            out.append(self._from_logits(logits, self.labels[part], self.sampled[part]))
            if self.extras:
                argmax.append(logits.argmax(-1))
                tempered = torch.log_softmax(logits / self.temperature, -1)
                entropy.append(-(tempered.exp() * tempered).sum(-1))
        if self.extras and argmax:  # (scoring runs without grad)
            self.argmax, self.entropy = torch.cat(argmax), torch.cat(entropy)
        return torch.cat(out)


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16 logits are softmaxed in fp32; float64 (tests) stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@contextlib.contextmanager
def _head_swapped(model, head: torch.nn.Module):
    """`model`'s output layer replaced by `head` for one forward (the wrapper around a DDP or
    DeepSpeed module is looked through)."""
    inner = getattr(model, "module", model)
    original = inner.get_output_embeddings()
    inner.set_output_embeddings(head)
    try:
        yield
    finally:
        inner.set_output_embeddings(original)


@dataclass
class PackedLogProbs:
    logp: torch.Tensor  # [reads] log-probs at the pack's reads (carries grad in the update)
    argmax: torch.Tensor | None  # [K] the model's greedy prediction there (with extras)
    entropy: torch.Tensor | None  # [K] entropy of the sampling distribution there (with extras)


def packed_logprobs(model, pack: Pack, *, temperature: float = 1.0, top_p: float = 1.0, autocast: bool = False,
                    extras: bool = False, chunk: int | None = None) -> PackedLogProbs:
    """One forward of a pack through `model` (a Hugging Face causal LM, possibly wrapped by DDP,
    DeepSpeed or sharded by FSDP2): the log-probs of its reads, in order."""
    inner = getattr(model, "module", model)
    device = next(inner.parameters()).device
    chunk = chunk or max(16, 2**27 // inner.config.vocab_size)  # ~512 MB of fp32 logits per chunk
    ids, pos, mask = pack.tensors(device)
    if inner.config._attn_implementation == "eager":  # eager attention adds its mask
        mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
    elif inner.config._attn_implementation != "sdpa":
        raise ValueError(f"packed sequences need sdpa or eager attention, not {inner.config._attn_implementation!r}")
    where = (torch.tensor(pack.read_row, device=device), torch.tensor(pack.read_col, device=device))
    head = ChunkedLogProbs(inner.get_output_embeddings(), where, torch.tensor(pack.labels, device=device),
                           torch.tensor(pack.sampled, device=device), temperature, top_p, extras, chunk)
    with _head_swapped(model, head), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        # logits_to_keep=0: the head gets every hidden state and projects only the reads
        out = model(input_ids=ids, attention_mask=mask[:, None], position_ids=pos, logits_to_keep=0, use_cache=False)
    return PackedLogProbs(out.logits, head.argmax, head.entropy)
