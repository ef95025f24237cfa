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
