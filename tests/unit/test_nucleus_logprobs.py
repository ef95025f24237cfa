"""Nucleus (top-p) log-probs of `rntp.forward.packing.sampling_logprobs` stay finite under TRL's fused
log-softmax kernel, which `trl.trainer.utils.selective_log_softmax` dispatches to on CUDA/XPU.

There is no GPU here, so the kernel's forward (trl/kernels/logprob_entropy.py, `_forward_kernel`) is
emulated with its own arithmetic: 1024-id blocks, a running max that starts at -inf, the sum
rescaled by exp(old max - new max). A leading block that is all -inf gives exp(-inf - -inf) = NaN."""

import math

import pytest
import torch
from trl.trainer.utils import selective_log_softmax

import rntp.forward.packing as packing
from rntp.forward.packing import LOGP_FLOOR, sampling_logprobs

pytestmark = pytest.mark.unit
BLOCK = 1024  # trl.kernels.logprob_entropy._BLOCK_SIZE


def trl_kernel_logprobs(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0, row_mask=None):
    """The TRL kernel's forward, row by row and block by block, as `_forward_kernel` computes it (the
    entropy's weighted sum is left out: selective_log_softmax returns only the log-probs)."""
    assert row_mask is None
    rows = logits.reshape(-1, logits.shape[-1]).float()
    out = []
    for row, index_ in zip(rows, index.reshape(-1).tolist()):
        row_max, denominator = torch.tensor(-math.inf), torch.tensor(0.0)
        for start in range(0, row.numel(), BLOCK):
            offsets = torch.arange(start, start + BLOCK)
            valid = offsets < row.numel()
            block = torch.full((BLOCK,), -math.inf)  # tl.load(..., mask=mask, other=-inf)
            block[valid] = row[start : start + BLOCK] / temperature
            new_max = torch.maximum(row_max, block.max())
            correction = torch.exp(row_max - new_max)
            probabilities = torch.where(valid, torch.exp(block - new_max), 0.0)
            denominator = denominator * correction + probabilities.sum()
            row_max = new_max
        log_z = row_max + torch.log(denominator)
        out.append(row[index_] / temperature - log_z)
    return torch.stack(out).reshape(index.shape)


def nucleus_of(logits_row: torch.Tensor, temperature: float, top_p: float) -> tuple[list[float], set[int]]:
    """float64 probabilities and the nucleus: tokens by probability, kept while the mass before them is below top_p."""
    probs = torch.softmax(logits_row.double() / temperature, -1).tolist()
    kept, above = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if above >= top_p:
            break
        kept.add(i)
        above += probs[i]
    return probs, kept


def float64_nucleus(logits_row: torch.Tensor, token: int, temperature: float, top_p: float) -> float:
    """By hand: log p of `token` renormalised over the nucleus, floored at LOGP_FLOOR."""
    probs, kept = nucleus_of(logits_row, temperature, top_p)
    if token not in kept:
        return LOGP_FLOOR
    return max(math.log(probs[token] / sum(probs[i] for i in kept)), LOGP_FLOOR)


def logits_with_a_high_nucleus(vocab: int = 3000) -> torch.Tensor:
    """Two rows whose nucleus holds only ids >= 1024: every id of the kernel's first block is masked."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, vocab, generator=gen)
    logits[:, 2000:2004] += torch.tensor([12.0, 11.5, 11.0, 10.0])
    return logits


def test_the_emulation_is_the_kernel_on_finite_logits():
    """On finite logits the emulated kernel gives what TRL's torch path gives (a check of the emulation)."""
    logits = 3 * torch.randn(3, 2500, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([5, 1500, 2499])
    torch.testing.assert_close(trl_kernel_logprobs(logits, ids), selective_log_softmax(logits, ids),
                               rtol=0, atol=1e-5)


def test_emulated_kernel_gives_nan_on_a_masked_first_block():
    logits = logits_with_a_high_nucleus()
    logits[:, :BLOCK] = -math.inf
    assert torch.isnan(trl_kernel_logprobs(logits, torch.tensor([2000, 2001]))).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_nucleus_logprobs_are_finite_under_the_trl_kernel(temperature, monkeypatch):
    """With the kernel in place of selective_log_softmax where packing calls it, nucleus log-probs of
    tokens inside (ids 2000-2003) and outside (5, 2500) the nucleus are finite and equal a float64
    reference (floored at LOGP_FLOOR outside)."""
    monkeypatch.setattr(packing, "selective_log_softmax", trl_kernel_logprobs, raising=False)
    logits = logits_with_a_high_nucleus()
    for ids in (torch.tensor([2000, 2001]), torch.tensor([5, 2500])):
        got = sampling_logprobs(logits, ids, temperature, top_p=0.9)
        assert torch.isfinite(got).all(), got
        want = [float64_nucleus(logits[i], int(t), temperature, 0.9) for i, t in enumerate(ids)]
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-5)


def test_nucleus_gradients_are_finite_and_zero_outside_it():
    logits = logits_with_a_high_nucleus().requires_grad_()
    sampling_logprobs(logits, torch.tensor([2001, 5]), 1.0, top_p=0.9).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[1].abs().sum() == 0  # a floored token carries no gradient
    probs, kept = nucleus_of(logits.detach()[0], 1.0, 0.9)  # row 0: d log p_2001 / d logit_j
    assert 2001 in kept and min(kept) >= BLOCK
    mass = sum(probs[j] for j in kept)
    want = torch.tensor([(j == 2001) - probs[j] / mass if j in kept else 0.0 for j in range(len(probs))],
                        dtype=torch.float64)
    torch.testing.assert_close(logits.grad[0].double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.9), (0.6, 0.5), (1.4, 0.95)])
def test_nucleus_logprobs_on_cpu_equal_the_torch_path(temperature, top_p):
    """On CPU, what TRL's torch path gave before (gather minus logsumexp over the masked logits), bit for bit."""
    gen = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(6, 700, generator=gen)
    ids = torch.randint(0, 700, (6,), generator=gen)
    ids[:3] = logits[:3].argmax(-1)  # some tokens surely inside the nucleus
    scaled = logits / temperature
    probs, order = scaled.softmax(-1).sort(-1, descending=True)
    outside = torch.zeros_like(scaled, dtype=torch.bool).scatter_(-1, order, probs.cumsum(-1) - probs >= top_p)
    before = selective_log_softmax(scaled.masked_fill(outside, -math.inf), ids).clamp(min=LOGP_FLOOR)
    assert torch.equal(sampling_logprobs(logits, ids, temperature, top_p), before)
