"""GPU-only paths: vLLM sleep/wake around the weight push, and server mode over NCCL.

Skipped without CUDA (CI and the CPU machines); run with `pytest tests/gpu -m gpu` on a GPU node.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from rntp.forward.scoring import token_logprobs
from rntp.config import load_config
from rollout import SamplingSpec, ThinkTags, make_sampler
from rollout.base import WeightStream
from tests.integration.test_distributed import ROOT
from tests.integration.test_server import prompts_of, start_server, stop_server, stream_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def trained_copy(model_dir, seq):
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([seq])
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    (-token_logprobs(policy, ids, torch.ones_like(ids)).sum()).backward()
    optimizer.step()
    return policy.eval()


def gap(sampler, policy, seq) -> float:
    served = torch.tensor(sampler.prompt_logprobs([seq])[0][1:])
    ids = torch.tensor([seq], device=next(policy.parameters()).device)
    with torch.no_grad():
        return (served - token_logprobs(policy, ids, torch.ones_like(ids))[0].cpu()).abs().max().item()


@pytest.mark.parametrize("level", [1, 2])
def test_sleeping_engine_frees_memory_and_wakes_with_the_pushed_weights(level, tiny_model_dir, tokenizer):
    cfg = load_config(None, [f"rollout.vllm.sleep_level={level}", "rollout.vllm.gpu_memory_utilization=0.2"])
    sampler = make_sampler("vllm", str(tiny_model_dir), ThinkTags(tokenizer), max_model_len=256,
                           vllm_cfg=cfg.rollout.vllm)
    try:
        sampler.sample(prompts_of(tokenizer, sampler.tags), SamplingSpec(n=2, max_tokens=4))
        free_awake = torch.cuda.mem_get_info()[0]
        sampler.sleep()
        assert torch.cuda.mem_get_info()[0] > free_awake + 2**28  # the KV cache (and weights) went
        seq = tokenizer.encode("Each module returns a list of names.", add_special_tokens=False)
        policy = trained_copy(tiny_model_dir, seq)
        sampler.push_weights(stream_of(policy))  # wakes: weights first, then the KV cache
        assert not sampler.asleep
        assert gap(sampler, policy, seq) < 1e-3
    finally:
        sampler.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs the server on another GPU than the trainer")
def test_server_mode_over_nccl(tiny_model_dir, tokenizer, tmp_path):
    proc, url = start_server(tiny_model_dir, tmp_path / "server.log", "rollout.server.weight_transfer=nccl",
                             "rollout.vllm.gpu_memory_utilization=0.3", env={"CUDA_VISIBLE_DEVICES": "1"})
    try:
        cfg = load_config(None, ["rollout.sampler=server", f"rollout.server.urls=[{url}]",
                                 "rollout.server.weight_transfer=nccl"])
        sampler = make_sampler("server", "", ThinkTags(tokenizer), server_cfg=cfg.rollout.server)
        seq = tokenizer.encode("Each module returns a list of names.", add_special_tokens=False)
        policy = trained_copy(tiny_model_dir, seq)
        sampler.push_weights(stream_of(policy.cuda()))  # NCCL sends from the trainer's GPU
        assert gap(sampler, policy.cpu(), seq) < 1e-3
        sampler.close()
    finally:
        stop_server(proc)


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")


@needs_deepspeed
def test_deepspeed_bf16_engine_on_one_gpu_reduces_metrics_and_feeds_the_ema(tiny_model_dir, monkeypatch):
    """Defects 1 and 3 on a GPU: DeepSpeed's world of one reduces CPU metrics (an NCCL-only group
    could not), and its bf16 weights move the float32 EMA teacher."""
    from rntp.distributed import all_gather_object, all_reduce_sum, init_distributed
    from rntp.engines import make_engine
    from rntp.models import load_trainable
    from rntp.train import follow, make_ema

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "dist.backend=deepspeed", "dist.zero_stage=2",
                             "model.autocast_bf16=true"])
    info = init_distributed()
    policy = load_trainable(str(tiny_model_dir), cfg, info, 1)
    ema = make_ema(policy)
    engine = make_engine(policy, cfg, info, 1, total_steps=1)
    assert all_reduce_sum([1.0, 2.0]) == [1.0, 2.0] and all_gather_object({"a": 1}) == [{"a": 1}]
    before = {n: p.clone() for n, p in ema.named_parameters()}
    with torch.no_grad():
        for p in engine.raw.parameters():
            p.add_(0.5)
    for bucket in engine.weights(bucket_mb=0.01):
        assert all(t.dtype == torch.bfloat16 for _, t in bucket)  # DeepSpeed's bf16 module
        follow(ema, 0.001, bucket)
    assert all((p - before[n]).abs().min() > 1e-4 for n, p in ema.named_parameters())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend, zero", [("ddp", 2), ("fsdp2", 2),
                                           pytest.param("deepspeed", 3, marks=needs_deepspeed)])
def test_two_gpus_match_one_gpu_on_the_same_global_batch(backend, zero, tiny_model_dir, tmp_path):
    """The CPU test's multi-rank check over NCCL (with gloo for CPU tensors in the same group)."""
    from tests.integration.test_distributed import PYTHONPATH, WORKER, torchrun

    env = {"PYTHONPATH": PYTHONPATH}
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, WORKER, "step", "--model", str(tiny_model_dir), "--out", str(one)],
                   env={**os.environ, **env}, check=True, cwd=ROOT)
    torchrun(WORKER, "step", "--model", str(tiny_model_dir), "--backend", backend, "--zero", str(zero),
             "--out", str(two))
    a, b = torch.load(one), torch.load(two)
    assert b["stats"]["optim/grad_norm"] == pytest.approx(a["stats"]["optim/grad_norm"], rel=1e-4)
    for name, ref in a["state"].items():
        torch.testing.assert_close(b["state"][name].float(), ref.float(), rtol=0, atol=1e-4, msg=name)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_bf16_engine_push_in_buckets_that_cut_fused_layers(tiny_model_dir, tokenizer):
    """Defect 2 on a GPU: one parameter per bucket into a bf16 colocated engine."""
    cfg = load_config(None, ["rollout.vllm.gpu_memory_utilization=0.2"])
    sampler = make_sampler("vllm", str(tiny_model_dir), ThinkTags(tokenizer), dtype="bfloat16", max_model_len=256,
                           vllm_cfg=cfg.rollout.vllm)
    try:
        seq = tokenizer.encode("Each module returns a list of names.", add_special_tokens=False)
        policy = trained_copy(tiny_model_dir, seq).cuda()
        named = list(policy.named_parameters(remove_duplicate=False))
        sampler.push_weights(WeightStream(lambda: iter([[(n, p.detach())] for n, p in named]),
                                          [(n, p.dtype, tuple(p.shape)) for n, p in named], 0.001))
        assert gap(sampler, policy, seq) < 5e-2  # bf16 engine against the fp32 trainer
    finally:
        sampler.close()
