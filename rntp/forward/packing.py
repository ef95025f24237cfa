"""Shared-prefix packing: each context computed once, its thoughts attending to it, in scoring and
in the update alike.

Every group of G thoughts shares one context, and the positions of one chunk share prefixes of it.
A pack row holds, per chunk, its tokens (the trunk: the longest context, plus the targets when
no-think scores are wanted), then every branch `[open tag][thought][close tag][target]` of that
chunk's positions. Each branch attends to the trunk before its position and to itself (causally),
and its position ids continue from its position, so every branch computes what the unshared
sequence `context + branch` computes, while the context's keys and values, and their gradient (the
sum over its branches), are computed once. Attention follows that structure (`rntp.forward.attention`): no
[W, W] mask, no work on pairs that cannot attend.

Why a packed row rather than a KV cache built with gradients: it is one ordinary forward and
backward, so gradient checkpointing, DDP, ZeRO 1-3 and FSDP2 see nothing unusual. A pack holds at
most `train.micro_batch` thoughts: whole groups while they fit, else a group's thoughts split over
packs, each with its context. With `shared=False` every thought gets its own copy of its context
(the unshared computation, for the benchmark and for debugging), through the same code.

Log-probs are read only where needed (thought tokens, targets, no-think targets), and the output
projection runs over them in chunks (`ChunkedLogProbs`): a chunk's [tokens x vocabulary] logits
live only while that chunk is computed, in backward too, so peak memory does not grow with
vocabulary size times the number of tokens read.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from trl.trainer.utils import selective_log_softmax

from rntp.forward.attention import Branch, PackAttention, PackLayout, install, row_layout
from rollout.spans import Rollout

LOGP_FLOOR = -1e4


def sampling_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                      top_p: float = 1.0) -> torch.Tensor:
    """log p of `ids` under the distribution the sampler draws from: logits divided by the
    temperature, then restricted to the top-p nucleus (the most likely tokens, kept while the mass
    above them is below `top_p`) and renormalised, as vLLM and transformers sample. A token outside
    the nucleus has probability 0; its log-prob is floored at LOGP_FLOOR to keep ratios finite.

    The masked logits never go to TRL's `selective_log_softmax`: on CUDA/XPU it runs a fused kernel
    whose online softmax starts its running max at -inf over 1024-id blocks, so a nucleus with no id
    in the first block gives exp(-inf - -inf) = NaN. torch's logsumexp handles -inf entries exactly
    (the same gather minus logsumexp TRL computes on CPU, so CPU results are unchanged)."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        probs, order = logits.float().softmax(-1).sort(-1, descending=True)
        mass_above = probs.cumsum(-1) - probs
        outside = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, mass_above >= top_p)
        logits = logits.masked_fill(outside, float("-inf"))
        picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return (picked - torch.logsumexp(logits, -1)).clamp(min=LOGP_FLOOR)
    return selective_log_softmax(logits, ids)  # finite logits: TRL's kernel is exact there



@dataclass
class Pack:
    """A micro-batch of packed rows, one per trunk (a chunk's shared context, or with `shared=False`
    one context copy per thought), and where its read-outs go. Rows are right-padded to one width;
    attention (`rntp.forward.attention`) follows each row's structure, so padding and the space between
    branches cost nothing but the padding's own tokens."""

    rows: list[dict] = field(default_factory=list)  # ids, pos, branches ((start, length, limit)) per row
    read_row: list[int] = field(default_factory=list)  # (row, column) whose next-token log-prob is read
    read_col: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # the token read there
    sampled: list[bool] = field(default_factory=list)  # a thought token: sampling distribution
    thoughts: dict[int, slice] = field(default_factory=dict)  # rollout -> its thought tokens among the reads
    targets: dict[int, slice] = field(default_factory=dict)  # rollout -> its target tokens
    no_think: dict[int, slice] = field(default_factory=dict)  # position -> its targets read on the trunk
    _layout: PackLayout | None = field(default=None, repr=False)  # built once the rows are complete

    @property
    def tokens(self) -> int:
        return sum(len(r["ids"]) for r in self.rows)

    @property
    def thought_count(self) -> int:
        return len(self.thoughts)

    def _read(self, col: int, label: int, sampled: bool = False) -> None:
        self.read_row.append(len(self.rows) - 1)
        self.read_col.append(col)
        self.labels.append(label)
        self.sampled.append(sampled)

    def add_trunk(self, tokens: list[int]) -> None:
        """A new row holding `tokens` from position 0."""
        self._layout = None
        self.rows.append({"ids": list(tokens), "pos": list(range(len(tokens))), "trunk": len(tokens),
                          "branches": []})

    def add_no_think(self, position: int, context_len: int, target: list[int]) -> None:
        first = len(self.labels)
        for h, token in enumerate(target):  # target h is predicted at the trunk token before it
            self._read(context_len + h - 1, token)
        self.no_think[position] = slice(first, len(self.labels))

    def add_branch(self, index: int, rollout: Rollout, context_len: int, target: list[int]) -> None:
        self._layout = None
        row = self.rows[-1]
        start = len(row["ids"])
        opened = rollout.prompt_ids[context_len:]
        tokens = opened + rollout.thought_ids + target
        row["ids"] += tokens
        row["pos"] += range(context_len, context_len + len(tokens))
        row["branches"].append(Branch(start, len(tokens), context_len))  # it sees the trunk before its position
        first = len(self.labels)
        for j in range(rollout.n_sampled):  # thought token j is predicted at the token before it
            self._read(start + len(opened) + j - 1, rollout.thought_ids[j], sampled=True)
        self.thoughts[index] = slice(first, len(self.labels))
        t0 = start + len(opened) + len(rollout.thought_ids)
        first = len(self.labels)
        for h, token in enumerate(target):
            self._read(t0 + h - 1, token)
        self.targets[index] = slice(first, len(self.labels))

    def layout(self) -> PackLayout:
        """The rows' attention structure, made once (the forward, every epoch's pass and the update's
        FLOP count all read it) with its per-device index tensors."""
        if self._layout is None:
            self._layout = PackLayout([row_layout(len(r["ids"]), r["trunk"], r["branches"]) for r in self.rows])
        return self._layout

    def tensors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and position ids [B, W], right-padded."""
        width = max(len(r["ids"]) for r in self.rows)

        def padded(key):
            return torch.tensor([r[key] + [0] * (width - len(r[key])) for r in self.rows], device=device)

        return padded("ids"), padded("pos")


def plan_packs(counts: list[int], micro_batch: int) -> list[list[tuple[int, int, int]]]:
    """Which thoughts go into which pack: per pack, (position, first, stop) slices of positions'
    thoughts (`counts` per position, in order), at most `micro_batch` thoughts per pack. Whole groups
    share a pack while they fit; a group larger than `micro_batch` is split into near-equal parts,
    each in a pack of its own with its context (the context's gradient is the sum over all its
    branches either way). A position without thoughts (no-think scores only) counts as one."""
    plan: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    filled = 0
    for g, count in enumerate(counts):
        units = max(count, 1)
        if units > micro_batch:
            if current:
                plan.append(current)
                current, filled = [], 0
            parts = -(-units // micro_batch)
            bounds = [round(units * k / parts) for k in range(parts + 1)]
            plan += [[(g, lo, hi)] for lo, hi in zip(bounds, bounds[1:])]
            continue
        if filled + units > micro_batch:
            plan.append(current)
            current, filled = [], 0
        current.append((g, 0, count))
        filled += units
    if current:
        plan.append(current)
    return plan


def build_packs(contexts: list[list[int]], rollouts: list[Rollout], targets: list[list[int]], *,
                micro_batch: int, shared: bool = True, no_think: bool = False,
                positions: list[int] | None = None) -> list[tuple[list[int], Pack]]:
    """Packs over `positions` (default all) of at most `micro_batch` thoughts each (`plan_packs`),
    each with the rollouts it holds (`rollouts[i].group` indexes `contexts` and `targets`).
    Consecutive positions whose context + target sequences are prefixes of one another (positions of
    one chunk) share a trunk. With `no_think`, the trunk holds the targets too and the positions'
    no-think targets are read (once per position, in the pack holding its first thoughts)."""
    by_position: dict[int, list[int]] = {}
    for i, r in enumerate(rollouts):
        by_position.setdefault(r.group, []).append(i)
    order = positions if positions is not None else sorted(by_position)
    packs = []
    for planned in plan_packs([len(by_position.get(g, [])) for g in order], micro_batch):
        chosen = [(order[p], lo, hi) for p, lo, hi in planned]
        pack = Pack()
        # runs of positions whose sequences are all prefixes of the run's longest (one chunk's
        # positions, or documents that open alike); the trunk is that longest
        runs: list[list[tuple[int, int, int]]] = []
        longest_seq: list[int] = []
        for entry in chosen:
            seq = contexts[entry[0]] + targets[entry[0]]
            if shared and runs and _nested(seq, longest_seq):
                runs[-1].append(entry)
                longest_seq = max(longest_seq, seq, key=len)
            else:
                runs.append([entry])
                longest_seq = seq
        held = []
        for run in runs:
            longest = max((g for g, _, _ in run), key=lambda g: len(contexts[g]))
            if shared:
                pack.add_trunk(contexts[longest] + (targets[longest] if no_think else []))
            for g, lo, hi in run:
                reads_no_think = no_think and lo == 0
                if not shared and reads_no_think:
                    pack.add_trunk(contexts[g] + targets[g])
                if reads_no_think:
                    pack.add_no_think(g, len(contexts[g]), targets[g])
                for i in by_position.get(g, [])[lo:hi]:
                    if not shared:  # every thought with its own copy of the context
                        pack.add_trunk(contexts[g])
                    pack.add_branch(i, rollouts[i], len(contexts[g]), targets[g])
                    held.append(i)
        packs.append((held, pack))
    return packs


def packs_per_step(positions: int, group_size: int, micro_batch: int) -> int:
    """How many packs (micro-passes) `positions` positions of `group_size` thoughts make."""
    return len(plan_packs([group_size] * positions, micro_batch))


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
                 sampled: torch.Tensor, temperature: float, top_p: float, extras: bool, chunk: int,
                 post: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.head, self.where, self.chunk, self.extras = head, where, chunk, extras
        self.labels, self.sampled, self.temperature, self.top_p = labels, sampled, temperature, top_p
        self.post = post or (lambda logits: logits)  # the model's own logit scaling or soft-capping
        self.argmax = self.entropy = None

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.post(_at_least_fp32(self.head(hidden)))

    def _logp(self, hidden: torch.Tensor, labels: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
        return self._from_logits(self._project(hidden), labels, sampled)

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
            logits = self._project(hidden[part])  # scoring: one projection serves all reads
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


@contextlib.contextmanager
def _logit_processing_moved_to_head(inner):
    """Models whose forward transforms what the output layer returns (Granite divides by
    `logits_scaling`, Cohere multiplies by `logit_scale`, Gemma 2/3 soft-cap at
    `final_logit_softcapping`) would apply it to the chunked head's log-probs. For one packed forward
    that step is switched off and handed to the head, which applies it to logits before the softmax.
    Other models that do something of the kind are caught by `check_packed_forward` at start-up."""
    config, steps, undo = inner.config, [], []

    def switch(owner, name, neutral):
        value = getattr(owner, name)
        setattr(owner, name, neutral)
        undo.append(lambda: setattr(owner, name, value))
        return value

    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
        scaling = switch(config, "logits_scaling", 1.0)
        steps.append(lambda x: x / scaling)
    if isinstance(getattr(inner, "logit_scale", None), (int, float)) and inner.logit_scale != 1:
        scale = switch(inner, "logit_scale", 1.0)
        steps.append(lambda x: x * scale)
    if getattr(config, "final_logit_softcapping", None):
        cap = switch(config, "final_logit_softcapping", None)
        steps.append(lambda x: torch.tanh(x / cap) * cap)

    def post(logits):
        for step in steps:
            logits = step(logits)
        return logits

    try:
        yield post
    finally:
        for restore in undo:
            restore()


@dataclass
class PackedLogProbs:
    logp: torch.Tensor  # [reads] log-probs at the pack's reads (carries grad in the update)
    argmax: torch.Tensor | None  # [K] the model's greedy prediction there (with extras)
    entropy: torch.Tensor | None  # [K] entropy of the sampling distribution there (with extras)


def packed_logprobs(model, pack: Pack, *, temperature: float = 1.0, top_p: float = 1.0, autocast: bool = False,
                    extras: bool = False, chunk: int | None = None, attention: str = "blocks") -> PackedLogProbs:
    """One forward of a pack through `model` (a Hugging Face causal LM, possibly wrapped by DDP,
    DeepSpeed or sharded by FSDP2): the log-probs of its reads, in order. `attention` picks the
    kernel (`rntp.forward.attention`): `blocks`, `flex` (CUDA) or the `dense` reference."""
    inner = getattr(model, "module", model)
    install(inner)
    device = next(inner.parameters()).device
    chunk = chunk or max(16, 2**27 // inner.config.vocab_size)  # ~512 MB of fp32 logits per chunk
    ids, pos = pack.tensors(device)
    structure = PackAttention(pack.layout(), attention, device)
    where = (torch.tensor(pack.read_row, device=device), torch.tensor(pack.read_col, device=device))
    # a 4-D placeholder mask: transformers then builds none (the structure travels as `rntp_pack`)
    placeholder = torch.ones(ids.shape[0], 1, 1, 1, dtype=torch.bool, device=device)
    with _logit_processing_moved_to_head(inner) as post:
        head = ChunkedLogProbs(inner.get_output_embeddings(), where, torch.tensor(pack.labels, device=device),
                               torch.tensor(pack.sampled, device=device), temperature, top_p, extras, chunk, post)
        with _head_swapped(model, head), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            # logits_to_keep=0: the head gets every hidden state and projects only the reads
            out = model(input_ids=ids, attention_mask=placeholder, position_ids=pos, logits_to_keep=0,
                        use_cache=False, rntp_pack=structure)
    return PackedLogProbs(out.logits, head.argmax, head.entropy)


def bf16_tolerance(largest_logit: float) -> float:
    """How far two bf16 forwards of one sequence may give apart log-probs: three steps of bf16 at the
    logits' magnitude (each log-prob rounds a logit and its log-sum-exp, and the packed and plain
    forwards run matmuls of other shapes), and no less than 0.1. bf16 keeps 8 significant bits, so
    logits near 25 are 0.125 apart. (A correct bf16 Qwen3 with logits near 37 differed by 0.19;
    one whose head doubles its logits, at the same magnitude, by 1.5.)"""
    step = torch.finfo(torch.bfloat16).eps * 2 ** math.floor(math.log2(max(largest_logit, 1.0)))
    return max(0.1, 3 * step)


@torch.no_grad()
def check_packed_forward(model, *, attention: str = "blocks", autocast: bool = False) -> None:
    """Start-up self-check: one small pack (a context, two thoughts, their targets) through the packed
    forward against plain forwards of the same sequences. A model whose attention ignores the pack's
    structure (its own attention code) or whose head does more than `_logit_processing_moved_to_head`
    knows gives other log-probs; it is refused in one line rather than trained on wrong rewards."""
    inner = getattr(model, "module", model)
    vocab = inner.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (40,), generator=gen).tolist()
    context, target = ids[:20], ids[30:34]
    rollouts = [Rollout(0, context + ids[20:21], ids[21:21 + n], n_sampled=n, closed=True) for n in (6, 9)]
    (_, pack), = build_packs([context], rollouts, [target], micro_batch=2, no_think=True)
    packed = packed_logprobs(model, pack, attention=attention, autocast=autocast).logp.float()
    device = next(inner.parameters()).device
    worst, largest = 0.0, 0.0
    for i, r in enumerate(rollouts):
        seq = r.prompt_ids + r.thought_ids + target
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=torch.tensor([seq], device=device), use_cache=False).logits[0].float()
        largest = max(largest, float(logits.abs().max()))
        plain = torch.log_softmax(logits, -1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
        first = len(r.prompt_ids) - 1
        expect = torch.cat([plain[first : first + r.n_sampled], plain[-len(target):]])
        got = torch.cat([packed[pack.thoughts[i]], packed[pack.targets[i]]])
        worst = max(worst, float((got - expect.to(got.device)).abs().max()))
    exact = next(inner.parameters()).dtype != torch.bfloat16 and not autocast
    if worst > (1e-3 if exact else bf16_tolerance(largest)):
        raise ValueError(f"{type(inner).__name__}: packed log-probs differ from a plain forward by {worst:.3g} "
                         "(its attention or output head does something RNTP's packed forward does not); "
                         "this model is not supported")
