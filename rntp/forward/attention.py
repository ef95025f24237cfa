"""Attention over shared-prefix packs whose work and memory follow the pack's structure.

A packed row (`rntp.forward.packing`) is a trunk (a chunk's tokens, causal) followed by branches
`[open][thought][close][target]`; a branch attends to the trunk before its position and to itself,
causally, and to nothing else. Three ways to compute that, chosen by `train.attention`:

- `blocks` (default, every device): per row, one causal attention over the trunk, and per position
  one attention of its branches (padded to the longest, batched) over `[trunk before the position;
  own branch]` with a lower-right causal bias. Both are plain `scaled_dot_product_attention` calls
  without a mask tensor (`is_causal`, `causal_lower_right`), so torch picks its flash kernels on
  GPUs (and the CPU flash kernel here, which has a backward), with grouped-query attention, and no
  tensor grows with the pack's width squared. What it copies: each position's trunk keys and values
  once per branch of the position (the keys a branch attends to), a few times the branch tokens.
- `flex` (CUDA): one FlexAttention call per layer with a `BlockMask` built once per pack from the
  same structure (transformers' flex integration, compiled). Its backward does not run on CPU.
- `dense`: the boolean [W, W] mask through SDPA, the reference the others are tested against.

`install` routes a model's attention through `packed_attention`, which takes the structure from
the `rntp_pack` keyword that `packing.packed_logprobs` passes down the model and behaves as SDPA
(with transformers' own masks) in every other forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

KINDS = ("blocks", "flex", "dense")
NAME = "rntp_packed"  # the attention implementation registered with transformers


@dataclass
class Branch:
    start: int  # first column in the row
    length: int
    limit: int  # it sees trunk columns [0, limit)


@dataclass
class RowLayout:
    width: int  # tokens in the row (before padding to the pack's width)
    trunk: int  # the row's first `trunk` tokens attend causally among themselves
    groups: list[list[Branch]]  # branches by position (one limit per group), in column order


@dataclass
class PackLayout:
    """The attention structure of a pack's rows, built without any [W, W] tensor."""

    rows: list[RowLayout]
    _index: dict = field(default_factory=dict, repr=False)

    @property
    def width(self) -> int:
        return max(r.width for r in self.rows)

    def pairs(self) -> int:
        """(query, key) pairs a branch- and trunk-causal attention must compute: its minimum work."""
        total = 0
        for row in self.rows:
            total += row.trunk * (row.trunk + 1) // 2
            total += sum(b.length * b.limit + b.length * (b.length + 1) // 2 for g in row.groups for b in g)
        return total

    def computed_pairs(self) -> int:
        """(query, key) pairs the `blocks` path computes with kernels that skip tiles above the causal
        diagonal (flash on GPUs): the minimum plus the padding of each position's branches to the
        longest of them."""
        total = 0
        for row in self.rows:
            total += row.trunk * (row.trunk + 1) // 2
            for g in row.groups:
                longest = max(b.length for b in g)
                total += len(g) * (longest * g[0].limit + longest * (longest + 1) // 2)
        return total

    def dense_pairs(self) -> int:
        """(query, key) pairs a dense masked kernel computes: every row's full square."""
        return len(self.rows) * self.width ** 2

    def index(self, device) -> list[tuple]:
        """Per row: the trunk length, and per group its limit, the [n, longest] columns of its
        branches (a padded slot repeats the branch's first column) and the flat positions of its real
        tokens in the [n * longest] padded order. Built once per pack and device, shared by layers."""
        key = str(device)
        if key not in self._index:
            out = []
            for row in self.rows:
                groups = []
                for g in row.groups:
                    longest = max(b.length for b in g)
                    cols = torch.tensor([[b.start + min(j, b.length - 1) for j in range(longest)] for b in g],
                                        device=device)
                    real = torch.tensor([i * longest + j for i, b in enumerate(g) for j in range(b.length)],
                                        device=device)
                    groups.append((g[0].limit, cols, real))
                out.append((row.trunk, groups))
            self._index[key] = out
        return self._index[key]

    def token_vectors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, W] per token: its branch (-1 trunk, -2 padding) and how many trunk columns it sees."""
        width = self.width
        branch = torch.full((len(self.rows), width), -2, dtype=torch.long)
        limit = torch.zeros((len(self.rows), width), dtype=torch.long)
        for r, row in enumerate(self.rows):
            branch[r, : row.trunk] = -1
            limit[r, : row.trunk] = row.trunk
            b_id = 0
            for g in row.groups:
                for b in g:
                    branch[r, b.start : b.start + b.length] = b_id
                    limit[r, b.start : b.start + b.length] = b.limit
                    b_id += 1
        return branch.to(device), limit.to(device)

    def dense_mask(self, device) -> torch.Tensor:
        """The reference: [B, W, W] boolean, True where query q may attend key k (padding sees itself)."""
        branch, limit = self.token_vectors(device)
        k = torch.arange(self.width, device=device)
        causal = k[None, None, :] <= k[None, :, None]
        trunk_key = (branch == -1)[:, None, :]
        sees_trunk = trunk_key & (k[None, None, :] < limit[:, :, None])
        own_branch = (branch[:, None, :] == branch[:, :, None]) & ~trunk_key
        eye = torch.eye(self.width, dtype=torch.bool, device=device)[None]
        return (causal & (sees_trunk | own_branch)) | eye


@lru_cache(maxsize=4096)
def _lower_right(queries: int, keys: int):
    """query i sees keys [0, keys - queries + i]: a branch sees its context and itself causally."""
    return causal_lower_right(queries, keys)


def row_layout(width: int, trunk: int, branches: list[Branch]) -> RowLayout:
    """Branches grouped by position (consecutive branches with one limit). A row that is one context
    and one branch right after it (an unshared sequence) is causal throughout: all trunk."""
    if len(branches) == 1 and branches[0].start == trunk == branches[0].limit:
        return RowLayout(width, trunk + branches[0].length, [])
    groups: list[list[Branch]] = []
    for b in branches:
        if groups and groups[-1][0].limit == b.limit:
            groups[-1].append(b)
        else:
            groups.append([b])
    return RowLayout(width, trunk, groups)


def block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PackLayout, *,
                    scale: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Exact attention of a pack, [B, H, W, d] queries and [B, Hkv, W, d] keys/values in, [B, W, H, d]
    out (transformers' layout). Rows are computed one by one: the trunk causally, then each
    position's branches together over the keys they may see."""
    kind = query.device.type
    if torch.is_autocast_enabled(kind):  # as autocast would cast SDPA's inputs (the causal bias is applied
        dtype = torch.get_autocast_dtype(kind)  # before autocast sees the call)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    gqa = query.shape[1] != key.shape[1]
    with _known_good_kernels(query.device):
        return _block_attention(query, key, value, layout, scale, dropout, gqa)


# cuDNN's SDPA backward gives NaN grad_q when a mask tensor is passed and the length is 64 mod 128
# (pytorch/pytorch#196678, huggingface/trl#7181; H100/H200, the default backend since torch 2.11):
# packed attention runs on flash or memory-efficient kernels only (the math one as the last resort).
_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _known_good_kernels(device: torch.device):
    return sdpa_kernel(_KERNELS) if device.type == "cuda" else contextlib.nullcontext()


def _block_attention(query, key, value, layout, scale, dropout, gqa) -> torch.Tensor:
    rows = []
    for r, (trunk, groups) in enumerate(layout.index(query.device)):
        q, k, v = query[r], key[r], value[r]  # [H, W, d]
        pieces = []
        if trunk:
            pieces.append(F.scaled_dot_product_attention(q[None, :, :trunk], k[None, :, :trunk], v[None, :, :trunk],
                                                         is_causal=True, scale=scale, dropout_p=dropout,
                                                         enable_gqa=gqa)[0])
        for limit, cols, real in groups:
            n, longest = cols.shape
            own_k, own_v = k[:, cols].transpose(0, 1), v[:, cols].transpose(0, 1)  # [n, Hkv, longest, d]
            keys = torch.cat([k[None, :, :limit].expand(n, -1, -1, -1), own_k], 2)
            values = torch.cat([v[None, :, :limit].expand(n, -1, -1, -1), own_v], 2)
            out = F.scaled_dot_product_attention(q[:, cols].transpose(0, 1), keys, values,
                                                 attn_mask=_lower_right(longest, limit + longest), scale=scale,
                                                 dropout_p=dropout, enable_gqa=gqa)  # [n, H, longest, d]
            pieces.append(out.transpose(0, 1).reshape(q.shape[0], n * longest, -1)[:, real])
        used = sum(p.shape[1] for p in pieces)
        if used < q.shape[1]:  # padding columns: never read
            pieces.append(q.new_zeros(q.shape[0], q.shape[1] - used, value.shape[-1]))
        rows.append(torch.cat(pieces, 1))
    return torch.stack(rows).transpose(1, 2).contiguous()


class PackAttention:
    """What a packed forward hands every attention layer: the pack's layout and the kernel, with
    whatever it needs built once for all layers (the BlockMask, or the reference's dense mask)."""

    def __init__(self, layout: PackLayout, kind: str, device):
        if kind not in KINDS:
            raise ValueError(f"train.attention must be one of {', '.join(KINDS)}, not {kind!r}")
        self.layout, self.kind, self.mask = layout, kind, None
        if kind == "flex":
            self.mask = flex_block_mask(layout, device)
        elif kind == "dense":
            self.mask = layout.dense_mask(device)[:, None]

    def __call__(self, module, query, key, value, **kwargs):
        window = kwargs.get("sliding_window")
        if window and window < self.layout.width:  # a window no sequence reaches changes nothing
            raise ValueError("packed attention does not implement sliding windows (refused at start-up)")
        if kwargs.get("softcap") and self.kind != "flex":  # Gemma 2's attention-score soft-capping
            raise ValueError("attention soft-capping needs train.attention=flex (refused at start-up)")
        if self.kind == "blocks":
            dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
            return block_attention(query, key, value, self.layout, scale=kwargs.get("scaling"), dropout=dropout), None
        if self.kind == "flex":
            from transformers.integrations.flex_attention import flex_attention_forward

            return flex_attention_forward(module, query, key, value, self.mask, **kwargs)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        with _known_good_kernels(query.device):
            return sdpa_attention_forward(module, query, key, value, self.mask, **kwargs)


def flex_block_mask(layout: PackLayout, device):
    """FlexAttention's BlockMask for a pack: the dense reference's rule as a mask_mod, evaluated at
    block granularity, so blocks with nothing to attend are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    branch, limit = layout.token_vectors(device)

    def mask_mod(b, h, q, kv):
        trunk_key = branch[b, kv] == -1
        sees = (trunk_key & (kv < limit[b, q])) | ((branch[b, q] == branch[b, kv]) & ~trunk_key)
        return ((kv <= q) & sees) | (q == kv)

    width = layout.width
    return create_block_mask(mask_mod, len(layout.rows), None, width, width, device=device,
                             _compile=torch.device(device).type == "cuda")


def packed_attention(module, query, key, value, attention_mask, *, rntp_pack: PackAttention | None = None, **kwargs):
    """The registered attention: a pack's structure when a packed forward passes one, else SDPA."""
    if rntp_pack is not None:
        return rntp_pack(module, query, key, value, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # ordinary forwards get SDPA's masks


# Inductor's CUDA lowering of flex attention refuses smaller query/key/value head dims (Triton's tl.dot:
# torch/_inductor/kernel/flex/flex_attention.py, "embedding dimension ... must be at least 16").
FLEX_MIN_HEAD_DIM = 16


def head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def unsupported(config, *, kind: str, device_type: str, longest_sequence: int) -> str | None:
    """Why a model (its transformers config) or device cannot take the structured path, or None; checked
    at start-up, before any weights load."""
    if kind == "flex" and device_type != "cuda":
        return (f"train.attention=flex needs CUDA (FlexAttention has no backward on {device_type}); "
                "use train.attention=blocks")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if kind == "flex" and head_dim(text) < FLEX_MIN_HEAD_DIM:
        return (f"train.attention=flex: {type(config).__name__} has heads of {head_dim(text)} dimensions and "
                f"FlexAttention compiles on CUDA only from {FLEX_MIN_HEAD_DIM}; use train.attention=blocks")
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None) or []
    windowed = "sliding_attention" in layer_types or (window and getattr(text, "use_sliding_window", True)
                                                      and not layer_types)
    if getattr(text, "attn_logit_softcapping", None) and kind != "flex":
        return (f"{type(config).__name__} soft-caps attention scores, which only train.attention=flex "
                "computes (CUDA)")
    if windowed and window and window < longest_sequence:
        return (f"{type(config).__name__}: sliding-window attention ({window} tokens) is not implemented by "
                f"RNTP's packed attention, and runs reach {longest_sequence} tokens; shorten data.chunk_tokens "
                "and rollout.max_thought_tokens below the window or use a model without one")
    return None


def install(model) -> None:
    """Route `model`'s attention (a transformers causal LM, possibly wrapped) through
    `packed_attention`. SDPA and eager models are taken (outside packed forwards they then run SDPA);
    any other implementation is refused in one line."""
    config = getattr(model, "module", model).config
    current = config._attn_implementation
    if current == NAME:
        return
    if current not in ("sdpa", "eager", None):
        raise ValueError(f"packed sequences need the model's attention to be sdpa or eager, not {current!r} "
                         "(load it with attn_implementation='sdpa')")
    _register()
    config._attn_implementation = NAME
