"""`make gpu-check`'s stage runner rehearsed on CPU with tiny shapes, so that the first GPU it meets runs
it rather than a rotted script: every stage in its own process, the report written whatever fails (a
stage made to fail and one made to hang past its limit, the stages after them still run), the training
figures (phases, MFU's numerator, packed against unshared tokens, memory beside `rntp plan`, the contexts
trained); and the FLOP counts against torch's."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_stage_runner_records_every_stage_whatever_fails(tmp_path, monkeypatch, capsys):
    from rntp.tools.gpu_check import FAULT_ENV, main

    monkeypatch.setenv(FAULT_ENV, "tests=raise,multi=hang")
    out = tmp_path / "gpu-check"
    main(["--tiny", "--sampler", "hf", "--limit", "multi=3", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["env", "tests", "train", "attention", "multi"]
    assert {name: s["status"] for name, s in stages.items()} == {
        "env": "ok", "tests": "failed", "train": "ok", "attention": "ok", "multi": "timeout"}
    assert "deliberate failure of stage tests" in stages["tests"]["error"]
    for name in stages:
        assert (out / f"{name}.log").exists()

    env = stages["env"]["result"]
    assert env["imports"]["rntp.train"]["ok"] and env["versions"]["torch"]["version"]

    train = stages["train"]["result"]
    setup = train["setup"]
    assert setup["recipe"]["C"] == 48 and setup["shape"] == "tiny"
    assert train["contexts"]["min"] == train["contexts"]["mean"] == 48  # contexts really C tokens
    assert train["steps_logged"] == 2 and train["steps_used"] == 1  # the warm-up step left out
    phases = train["phases"]
    assert abs(sum(p["share"] for p in phases.values()) - 1) < 0.02
    for phase in ("sample", "score", "update"):
        assert phases[phase]["seconds"] > 0 and phases[phase]["tokens_per_s"] > 0
    update = train["update"]
    assert 0 < update["packed_tokens"] < update["unshared_tokens"]  # each context once
    assert 0 < update["model_flops"] < update["hardware_flops"]  # HFU adds the recompute
    assert "mfu" not in update and "no known dense bf16 peak" in update["mfu_note"]  # CPU: no peak, no MFU
    assert train["memory_gb"]["peak_allocated"] > 0 and train["memory_gb"]["plan"]["peak"] > 0
    assert any("warm-up" in c for c in report["cut"])
    assert train["checkpoint"]["seconds"] >= 0 and train["checkpoint"]["checkpoints_gb"] > 0  # the final one, timed

    paths = stages["attention"]["result"]["paths"]
    assert paths["blocks"]["ratio_to_minimum"] == 1.0 and paths["dense"]["ratio_to_minimum"] > 1
    assert paths["unshared"]["ratio_to_minimum"] > 1  # each context once per thought
    assert paths["unshared"]["tokens_forwarded"] > paths["blocks"]["tokens_forwarded"]
    assert "no backward on CPU" in paths["flex"]["skipped"]
    for label in ("blocks", "dense", "unshared"):
        assert paths[label]["update_s"] > 0, paths[label]
    printed = capsys.readouterr().out
    assert "gpu-check summary" in printed and "timeout" in printed


def test_peak_by_exact_device_name():
    from rntp.tools.gpu_check import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_tflops("NVIDIA H200") == 989.4 and peak_tflops("NVIDIA H200 NVL") == 835.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("NVIDIA B200") == 2250.0
    assert peak_tflops("NVIDIA H100") is None and peak_tflops("cpu") is None  # form factor unknown: no MFU


def test_kit_reads_the_gpu_lock_for_python_312():
    from rntp.tools.gpu_check import ROOT, locked_versions

    versions = locked_versions(ROOT / "requirements" / "gpu.txt")
    assert versions["contourpy"] == "1.4.0"  # the pin for Python >= 3.12, not the 3.11 one
    assert versions["transformers"] and versions["deepspeed"] and versions["pydantic-core"]
    assert "pywin32" not in versions  # a Windows-only pin


def test_executed_update_flops_match_torchs_count_of_the_matmuls(tiny_model_dir):
    """gpu_check's HFU numerator (`update_flops`, from the update's own metrics) against
    torch.utils.flop_counter on a real update: the linear layers and the head (every 2-D matmul:
    forward, backward, the checkpointing recompute and the head's recompute) agree to 1%; attention
    (batched products under SDPA's math kernel) is at least the pairs' minimum and at most the
    padded square blocks it multiplies. The MFU numerator (`model_flops`) is 3 forwards."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from rntp.tools.bench import long_batch
    from rntp.config import load_config
    from rntp.distributed import DistInfo
    from rntp.engines import make_engine
    from rntp.tools.gpu_check import model_flops, update_flops
    from rntp.models import load_policy
    from rntp.tools.plan import forward_flops, shape_from_config
    from rntp.forward.scoring import score_groups
    from rntp.train import update_policy

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "train.micro_batch=3",
                             "model.gradient_checkpointing=true"])
    policy = load_policy(str(tiny_model_dir), cfg, torch.device("cpu"))
    batch = long_batch(60, 20, 4, 4, policy.config.vocab_size)
    scored = score_groups(policy.eval(), batch["contexts"], batch["rollouts"], batch["targets"], pad_id=0,
                          micro_batch=3)
    engine = make_engine(policy.train(), cfg, DistInfo(), 1, total_steps=1)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        row = update_policy(engine, ref=None, contexts=batch["contexts"], rollouts=batch["rollouts"],
                            targets=batch["targets"], scored=scored, advantages=torch.randn(4),
                            keep=torch.ones(4, dtype=torch.bool), cfg=cfg)
    counts = {str(op): f for op, f in counter.get_flop_counts()["Global"].items()}
    shape = shape_from_config(policy.config)
    ours = update_flops(row, shape, checkpointing=True)
    attention = 4 * 4 * shape.layers * shape.heads * shape.head_dim * row["update/attention_pairs"]
    matmuls = sum(f for op, f in counts.items() if op in ("aten.mm", "aten.addmm"))
    assert abs(matmuls - (ours - attention)) / matmuls < 0.01, (matmuls, ours - attention)
    assert attention <= counts["aten.bmm"] <= 2 * attention
    forward = forward_flops(shape, row["update/packed_tokens"], row["update/read_tokens"],
                            row["update/attention_pairs"])
    assert model_flops(row, shape) == 3 * forward < ours
