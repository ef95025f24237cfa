"""Packed attention on CUDA: the blocks path (flash / memory-efficient kernels) and FlexAttention give
the gradients of unshared sequences, bf16 included; no NaN at lengths 64 mod 128 with the inputs that
make cuDNN's masked backward produce it (pytorch/pytorch#196678).

Skipped without CUDA; `make gpu-check` runs them."""

import math

import pytest
import torch

from rntp.forward.attention import FLEX_MIN_HEAD_DIM, PackLayout, block_attention
from tests.integration.test_long_packs import gradients, long_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def flex_shaped(make_model, device, dtype):
    """The CPU tests' narrow Qwen3 (`make_model`) with heads as narrow as flex compiles on CUDA, on
    `device` in `dtype`. A CPU test checks the shape (tests/integration/test_model_heads.py)."""
    return lambda *a, **k: make_model(*a, **{**k, "head_dim": FLEX_MIN_HEAD_DIM}).to(device, dtype)


@pytest.mark.parametrize("kind, dtype, tolerance", [("blocks", torch.float64, 1e-9), ("flex", torch.float32, 1e-4)])
def test_blocks_and_flex_equal_unshared_on_cuda(kind, dtype, tolerance, monkeypatch):
    """On the GPU, through CUDA's kernels (flex compiled, as training runs it; its Triton kernels take
    float32, not float64): the agreement with unshared sequences the CPU tests show, split groups too."""
    import tests.integration.test_long_packs as long

    monkeypatch.setattr(long, "narrow_qwen3", flex_shaped(long.narrow_qwen3, "cuda", dtype))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    batch = long_batch()
    ref_grads, ref_reads = gradients(batch, pack=dict(micro_batch=16, shared=False))
    for micro_batch in (16, 3):
        grads, reads = gradients(batch, pack=dict(micro_batch=micro_batch), attention=kind)
        for key in ref_reads:
            scale = ref_reads[key].abs().max()
            assert float((reads[key] - ref_reads[key]).abs().max() / scale) < tolerance, (kind, key)
        for name in ref_grads:
            scale = ref_grads[name].abs().max().clamp(min=1e-30)
            assert float((grads[name] - ref_grads[name]).abs().max() / scale) < tolerance, (kind, name)


@pytest.mark.parametrize("trunk", [704, 1088])  # 64 mod 128: where cuDNN's masked backward fails
def test_bf16_block_attention_gradients_are_finite_where_cudnn_gives_nan(trunk):
    """Every logit about -120 (every row's log-sum-exp below ln(FLT_MAX)), as in the cuDNN report: the
    blocks path's gradients are finite and close to a float32 computation of the same layout."""
    from rntp.forward.attention import Branch, row_layout

    branches = [Branch(trunk + 200 * i, 200, trunk) for i in range(3)]
    layout = PackLayout([row_layout(trunk + 600, trunk, branches)])
    d = 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, trunk + 600, d, device="cuda", generator=gen) * 0.1
    k = torch.randn(1, 2, trunk + 600, d, device="cuda", generator=gen) * 0.1
    v = torch.randn(1, 2, trunk + 600, d, device="cuda", generator=gen)
    q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(d)
    grads = {}
    for dtype in (torch.bfloat16, torch.float32):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = block_attention(*leaves, layout)
        out.float().backward(torch.ones_like(out, dtype=torch.float32))
        grads[dtype] = [t.grad.float() for t in leaves]
    for low, high in zip(grads[torch.bfloat16], grads[torch.float32]):
        assert torch.isfinite(low).all()
        assert float((low - high).abs().max()) <= 0.05 * float(high.abs().max()) + 1e-3
