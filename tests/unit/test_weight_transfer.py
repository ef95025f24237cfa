"""The gloo weight-transfer wire format: a bucket packed to bytes and unpacked on the server side."""

import pytest
import torch

from rollout.vllm_utils import vllm_available

pytestmark = [pytest.mark.unit, pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")]


def test_a_bucket_of_mixed_dtypes_round_trips_exactly():
    from rollout.weight_transfer import describe, pack, unpack

    torch.manual_seed(0)
    bucket = [("a.weight", torch.randn(3, 5)), ("b.bias", torch.randn(7).to(torch.bfloat16)),
              ("c.scale", torch.randn(2, 2, 2, dtype=torch.float64)), ("d.index", torch.arange(4)),
              ("e.t", torch.randn(4, 3).t())]  # non-contiguous: packed by value, not by storage
    buffer = pack(t for _, t in bucket)
    assert buffer.dtype == torch.uint8 and buffer.numel() == 15 * 4 + 7 * 2 + 8 * 8 + 4 * 8 + 12 * 4
    out = unpack(buffer.clone(), describe(bucket))
    assert [n for n, _ in out] == [n for n, _ in bucket]
    for (_, sent), (_, got) in zip(bucket, out):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert torch.equal(got, sent)


def test_a_bucket_that_disagrees_with_its_description_is_refused():
    from rollout.weight_transfer import describe, pack, unpack

    bucket = [("a", torch.ones(4)), ("b", torch.ones(2))]
    with pytest.raises(ValueError, match="holds 20 bytes, its description 24"):
        unpack(pack(t for _, t in bucket[:1] + [("b", torch.ones(1))]), describe(bucket))
