"""What the GPU path asks of torch and DeepSpeed, checked on CPU where the call itself can be seen:
the process group's backend map, DeepSpeed's dtypes, and what each rank's collectives carry."""

import pytest
import torch

from rntp import distributed, engines
from rntp.config import load_config

pytestmark = pytest.mark.unit


def backend_map(backend: str) -> dict[str, str]:
    """torch's "cpu:gloo,cuda:nccl" form (or one name for every device) as {device: backend}."""
    if ":" not in backend:
        return {"cpu": backend, "cuda": backend}
    return dict(pair.split(":") for pair in backend.split(","))


@pytest.mark.parametrize("world", ["1", "4"])
def test_a_cuda_process_group_serves_cpu_tensors_too(world, monkeypatch):
    """Metrics, stop requests and checkpoint state are reduced as CPU tensors and pickled objects:
    on GPUs the default group must map the CPU to gloo, since NCCL alone cannot reduce them."""
    created = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: bool(created))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: created.append(backend))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: int(world))
    monkeypatch.setattr(distributed.dist, "new_group", lambda backend=None, **kw: f"group({backend})")
    monkeypatch.setattr(distributed, "_group", None)
    for key, value in {"WORLD_SIZE": world, "LOCAL_RANK": "0", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29400"}.items():
        monkeypatch.setenv(key, value)
    info = distributed.init_distributed()
    distributed.init_process_group(info.device)  # what the DeepSpeed engine asks for, even in a world of one
    assert len(created) == 1
    devices = backend_map(created[0])
    assert devices["cuda"] == "nccl"
    assert devices["cpu"] == "gloo"


def test_the_helpers_reduce_cpu_tensors_on_a_gloo_group_of_their_own(monkeypatch):
    """Whoever made the default group (RNTP with its backend map, or vLLM with NCCL alone), the helpers'
    CPU tensors and objects go to a group made with gloo; in a world of one they stay local."""
    seen, made = [], []
    monkeypatch.setattr(distributed, "_group", None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: seen.append(t))
    assert distributed.all_reduce_sum([1.0, 2.0]) == [1.0, 2.0] and not seen  # a world of one
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(torch.distributed, "new_group", lambda backend=None, **kw: made.append(backend) or "gloo")
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, group=None: seen.append((t.device.type, group)))
    distributed.all_reduce_sum([1.0, 2.0])
    distributed.all_reduce_sum([3.0])
    assert made == ["gloo"]  # made once
    assert seen == [("cpu", "gloo"), ("cpu", "gloo")]


def test_deepspeed_accumulates_bf16_gradients_in_fp32():
    cfg = load_config(None, ["model.autocast_bf16=true", "dist.backend=deepspeed", "dist.zero_stage=2"])
    ds = engines.deepspeed_config(cfg, world_size=8, micro_steps=4)
    assert ds["bf16"]["enabled"] is True
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    fp32 = engines.deepspeed_config(load_config(None, ["dist.backend=deepspeed"]), 8, 4)
    assert fp32["bf16"]["enabled"] is False


def test_ema_teacher_follows_bf16_weights_in_fp32():
    """RLP's EMA teacher (decay 0.999) under bf16 training: the buckets come in bf16 (DeepSpeed's
    bf16 engine), and a 0.001 step must still move the teacher (it would not in bf16)."""
    from rntp.train import follow, make_ema

    torch.manual_seed(0)
    policy = torch.nn.Linear(16, 16).to(torch.bfloat16)
    ema = make_ema(policy)
    assert all(p.dtype == torch.float32 for p in ema.parameters())
    start = {n: p.double().clone() for n, p in ema.named_parameters()}
    moved = {n: (p.double() + 0.5).to(torch.bfloat16) for n, p in policy.named_parameters()}
    for _ in range(10):
        follow(ema, 0.001, [(n, t) for n, t in moved.items()])
    for name, p in ema.named_parameters():
        expected = start[name].clone()
        for _ in range(10):  # float64 reference: e <- e + w (target - e)
            expected += 0.001 * (moved[name].double() - expected)
        assert (p.double() - start[name]).abs().min() > 0.004  # each step moved every weight
        torch.testing.assert_close(p.double(), expected, rtol=0, atol=1e-6)


def test_weight_buckets_end_only_between_layers():
    """Many small buckets (as a 70B push in 256 MB buckets is): none ends inside a decoder layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1)
    named = [(n, p.detach()) for n, p in LlamaForCausalLM(config).named_parameters(remove_duplicate=False)]
    buckets = list(engines.layer_buckets(iter(named), bucket_mb=4096 / 2**20))  # 4 KB: several per layer
    assert [item for b in buckets for item in b] == named  # every weight once, in order
    assert len(buckets) >= 5
    for before, after in zip(buckets, buckets[1:]):
        assert engines.layer_of(before[-1][0]) != engines.layer_of(after[0][0])
    layer = [n for n, _ in named if n.startswith("model.layers.1.")]
    holding = [i for i, b in enumerate(buckets) if any(n.startswith("model.layers.1.") for n, _ in b)]
    assert len(holding) == 1 and len(layer) == 9  # q, k, v, o, gate, up, down and two norms together
