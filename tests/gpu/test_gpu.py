"""GPU-only paths: vLLM sleep/wake around the weight push, and server mode over NCCL.

Skipped without CUDA (CI and the CPU machines); run with `pytest tests/gpu -m gpu` on a GPU node.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from rewards.scoring import token_logprobs
from rntp.config import load_config
from rollout import SamplingSpec, ThinkTags, make_sampler
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
    ids = torch.tensor([seq])
    with torch.no_grad():
        return (served - token_logprobs(policy, ids, torch.ones_like(ids))[0]).abs().max().item()


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
