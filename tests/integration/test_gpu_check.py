"""`make gpu-check`'s bench runs end to end (here on CPU, with the tiny shape), so that the first GPU
it meets runs it rather than a rotted script."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_gpu_check_bench_reports_every_phase(tmp_path, capsys):
    from rntp.gpu_check import main

    main(["--shapes", "tiny", "--steps", "2", "--context", "128", "--thought", "8", "--group", "2",
          "--positions", "2", "--micro-batch", "4", "--sampler", "hf", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    tiny = report["shapes"]["tiny"]
    assert tiny["params"] > 0 and tiny["peak_gb"] > 0
    for phase in ("sample", "score", "update"):
        assert tiny[f"{phase}_tok_s"] > 0 and tiny[f"{phase}_s"] > 0
    assert tiny["update_tflops"] > 0
    printed = capsys.readouterr().out
    assert "update" in printed and "tok/s" in printed


def test_executed_update_flops_match_torchs_count_of_the_matmuls(tiny_model_dir):
    """gpu_check's MFU numerator (`update_flops`, from the update's own metrics) against
    torch.utils.flop_counter on a real update: the linear layers and the head (every 2-D matmul:
    forward, backward, the checkpointing recompute and the head's recompute) agree to 1%; attention
    (batched products under SDPA's math kernel) is at least the pairs' minimum and at most the
    padded square blocks it multiplies."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from rntp.bench import long_batch
    from rntp.config import load_config
    from rntp.distributed import DistInfo
    from rntp.engines import make_engine
    from rntp.gpu_check import update_flops
    from rntp.models import load_policy
    from rntp.plan import shape_from_config
    from rntp.scoring import score_groups
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
