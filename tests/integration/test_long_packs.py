"""Packs at long lengths with a narrow model of a real architecture (Qwen3: grouped-query attention,
q/k norms), float64: the structured attention (`blocks`), the dense-mask reference and unshared
sequences give the same log-probs and gradients, also with groups split over micro-packs and with
gradient checkpointing; and no tensor of the pack's width squared exists in a packed forward and
backward."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen3Config, Qwen3ForCausalLM

from rntp.forward.attention import PackLayout, block_attention, flex_block_mask
from rntp.forward.packing import build_packs, packed_logprobs
from rollout import Rollout
from tests.integration.test_packing import exact_rope

pytestmark = pytest.mark.integration
VOCAB, OPEN, CLOSE, H, G = 512, [3], [4], 16, 8


def narrow_qwen3(dtype=torch.float64, checkpointing=False, head_dim=8):
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=4096,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    model = exact_rope(Qwen3ForCausalLM(config).to(dtype))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def long_batch(context_lens=(150, 300), chunk=320, thought=(40, 260), seed=0):
    """One chunk of `chunk` tokens with positions at `context_lens` (nested contexts), G thoughts each
    of random lengths in `thought`, half of them closed, the rest truncated (close appended)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(10, VOCAB, (n,), generator=gen).tolist()  # noqa: E731
    doc = rand(chunk + H)
    contexts = [doc[:c] for c in context_lens]
    targets = [doc[c : c + H] for c in context_lens]
    rollouts = []
    for g in range(len(contexts)):
        for j in range(G):
            n = int(torch.randint(thought[0], thought[1], (1,), generator=gen))
            rollouts.append(Rollout(g, contexts[g] + OPEN, rand(n) + CLOSE, n_sampled=n + (j % 2), closed=j % 2 == 1))
    return contexts, rollouts, targets


def weighted_loss(model, batch, weights, **kwargs):
    """A fixed random combination of every read log-prob (thoughts, targets, no-think targets)."""
    contexts, rollouts, targets = batch
    total, reads = 0, {}
    for _, pack in build_packs(contexts, rollouts, targets, no_think=True, **kwargs.pop("pack")):
        logp = packed_logprobs(model, pack, temperature=0.7, chunk=257, **kwargs).logp
        for kind, spans in (("thought", pack.thoughts), ("target", pack.targets), ("plain", pack.no_think)):
            for key, span in spans.items():
                reads[kind, key] = logp[span]
                total = total + (logp[span] * weights[kind, key][: span.stop - span.start].to(logp)).sum()
    return total, reads


def gradients(batch, checkpointing=False, **kwargs):
    model = narrow_qwen3(checkpointing=checkpointing)
    gen = torch.Generator().manual_seed(5)
    weights = {(kind, k): torch.randn(400, generator=gen, dtype=torch.float64)
               for kind in ("thought", "target", "plain") for k in range(len(batch[1]))}
    loss, reads = weighted_loss(model, batch, weights, **kwargs)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, {k: v.detach() for k, v in reads.items()}


def assert_same(a: dict, b: dict, rel=1e-9):
    assert set(a) == set(b)
    for key in a:
        scale = b[key].abs().max().clamp(min=1e-30)
        assert float((a[key] - b[key]).abs().max() / scale) < rel, key


def test_long_packs_equal_unshared_and_dense_in_logprobs_and_gradients():
    batch = long_batch()
    unshared_grads, unshared_reads = gradients(batch, pack=dict(micro_batch=2 * G, shared=False))
    runs = {"blocks": gradients(batch, pack=dict(micro_batch=2 * G)),
            "blocks, groups split in 3": gradients(batch, pack=dict(micro_batch=3)),
            "blocks, checkpointed": gradients(batch, checkpointing=True, pack=dict(micro_batch=G)),
            "dense": gradients(batch, pack=dict(micro_batch=2 * G), attention="dense")}
    for name, (grads, reads) in runs.items():
        assert_same(reads, unshared_reads), name
        assert_same(grads, unshared_grads), name


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("attention", ["blocks", "dense"])
def test_no_tensor_of_the_width_squared_in_a_long_packed_forward_and_backward(attention):
    """At C=600 and thoughts up to 600 tokens (a pack ~4.5k wide) the largest tensor of a `blocks`
    forward and backward stays within a few times W x (T + H) per head; the dense reference makes
    W x W ones (which shows the check can fail)."""
    contexts, rollouts, targets = long_batch(context_lens=(600,), chunk=600, thought=(400, 600))
    (_, pack), = build_packs(contexts, rollouts, targets, micro_batch=G, no_think=True)
    width = max(len(r["ids"]) for r in pack.rows)
    model = narrow_qwen3(torch.float32)
    with torch.no_grad():  # the causal biases are made (and cached) outside the recording mode
        packed_logprobs(model, pack, attention=attention)
    with LargestTensor() as seen:
        packed_logprobs(model, pack, attention=attention).logp.sum().backward()
    longest_branch = max(len(r.thought_ids) for r in rollouts) + 1 + H
    if attention == "dense":
        assert seen.largest >= width * width
    else:
        assert seen.largest < 4 * width * longest_branch, (seen.largest, seen.op)
        assert seen.largest < width * width / 4


def test_flex_block_mask_and_blocks_agree_on_a_pack():
    """FlexAttention (forward only here: it has no backward on CPU) with the pack's BlockMask computes
    what the blocks path does, GQA included."""
    from torch.nn.attention.flex_attention import flex_attention

    contexts, rollouts, targets = long_batch(context_lens=(40, 90), chunk=100, thought=(5, 60))
    packs = build_packs(contexts, rollouts, targets, micro_batch=5, no_think=True)  # split groups
    layout = PackLayout([row for _, p in packs for row in p.layout().rows])  # several rows of one pack
    width = layout.width
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(len(layout.rows), 4, width, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(len(layout.rows), 2, width, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    blocks = block_attention(q, k, v, layout)  # [B, W, H, d]
    flex = flex_attention(q, k, v, block_mask=flex_block_mask(layout, "cpu"), enable_gqa=True).transpose(1, 2)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask("cpu")[:, None],
                                                             enable_gqa=True).transpose(1, 2)
    for r, row in enumerate(layout.rows):  # padding columns are never read
        torch.testing.assert_close(blocks[r, : row.width], dense[r, : row.width], rtol=0, atol=1e-12)
        torch.testing.assert_close(flex[r, : row.width], dense[r, : row.width], rtol=0, atol=1e-12)


def test_pairs_count_what_a_causal_branch_may_see():
    """`PackLayout.pairs` against the dense mask's count of allowed (query, key) pairs."""
    contexts, rollouts, targets = long_batch(context_lens=(30, 70), chunk=80, thought=(3, 20))
    for micro_batch in (3, 16):
        for _, pack in build_packs(contexts, rollouts, targets, micro_batch=micro_batch, no_think=True):
            layout = pack.layout()
            mask = layout.dense_mask("cpu")
            allowed = sum(int(mask[r, : row.width, : row.width].sum()) for r, row in enumerate(layout.rows))
            assert layout.pairs() == allowed
            assert layout.pairs() <= layout.computed_pairs() <= layout.dense_pairs()


def test_flex_block_mask_skips_the_tiles_nothing_attends():
    """The BlockMask of a long pack (C=1024, 8 branches of 512) keeps about the block-causal share of
    its 128 x 128 tiles, not all of them."""
    from rntp.forward.attention import Branch, row_layout

    trunk, branch, n = 1024, 512, 8
    layout = PackLayout([row_layout(trunk + n * branch, trunk,
                                    [Branch(trunk + i * branch, branch, trunk) for i in range(n)])])
    skipped = flex_block_mask(layout, "cpu").sparsity() / 100  # share of tiles not computed
    minimum = layout.pairs() / layout.dense_pairs()
    assert 1 - skipped < 1.3 * minimum, (1 - skipped, minimum)
