"""A tiny real sweep (two rewards x 2 steps), its comparison report, skips on re-run, early errors."""

import json
import re

import pytest
import yaml

from rntp.cli import main
from rntp.config import ConfigError
from rntp.experiments.sweep import expand, load_sweep, plan, run_sweep

pytestmark = pytest.mark.integration


@pytest.fixture
def base_config(tmp_path, tiny_model_dir, corpus_file):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"source": str(corpus_file), "chunk_tokens": 64, "min_context": 16, "horizon": 4},
        "rollout": {"sampler": "hf", "group_size": 4, "max_thought_tokens": 6, "tag_tokens": "text"},
        "train": {"steps": 2, "positions_per_step": 2, "micro_batch": 8},
        "log": {"wandb_mode": "disabled", "progress": False, "plot": False},
    }))
    return path


def write_sweep(tmp_path, base_config, **fields):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": str(base_config), "out_dir": str(tmp_path / "sweep"),
                                    **fields}, sort_keys=False))
    return path


def test_grid_runs_and_seeds_expand_to_named_runs(tmp_path, base_config):
    sweep = load_sweep(write_sweep(tmp_path, base_config, grid={"reward.name": ["a", "b"], "grpo.clip_high": [0.2]},
                                   runs=[{"name": "x", "overrides": ["train.steps=1"]}], seeds=[0, 5]))
    runs = dict(expand(sweep))
    assert len(runs) == 4
    overrides = runs["x__name-b__clip_high-0.2__seed-5"]
    assert {"train.steps=1", "reward.name=b", "grpo.clip_high=0.2", "train.seed=5", "data.seed=5"} <= set(overrides)


def test_tiny_sweep_runs_compares_and_skips_finished_runs(tmp_path, base_config, capsys):
    path = write_sweep(tmp_path, base_config, grid={"reward.name": ["target_logprob", "next_token_accuracy"]})
    assert main(["sweep", str(path)]) == 0
    out = tmp_path / "sweep"
    printed = capsys.readouterr().out  # one line as each run starts and ends; the runs' output is in train.log
    assert re.search(r"^finished name-target_logprob in \d+\.\d min$", printed, re.M), printed
    assert "wandb: " not in printed and (out / "name-target_logprob" / "train.log").stat().st_size > 0
    for name in ("name-target_logprob", "name-next_token_accuracy"):
        rows = [json.loads(line) for line in open(out / name / "metrics.jsonl")]
        assert [r["step"] for r in rows] == [1, 2]
        assert yaml.safe_load((out / name / "config.yaml").read_text())["log"]["wandb_group"] == "tiny"
    report = (out / "compare" / "report.html").read_text()
    assert "name-target_logprob" in report and "name-next_token_accuracy" in report and "<img" in report
    table = (out / "compare" / "compare.md").read_text()
    assert "reward/mean final" in table and table.count("\n| name-") == 2
    assert (out / "compare" / "compare.csv").exists() and (out / "compare" / "reward_mean.png").exists()
    before = (out / "name-target_logprob" / "metrics.jsonl").read_text()
    runs = run_sweep(path)  # a re-run skips what is finished
    assert {r["status"] for r in runs} == {"finished"}
    assert (out / "name-target_logprob" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("fields, message", [
    ({"grid": {"train.stepz": [1]}}, "train.stepz: Extra inputs are not permitted"),
    ({"grid": {"reward.name": ["target_logprob", "nope"]}}, "unknown reward 'nope'; registered rewards:"),
    ({"gird": {"reward.name": ["target_logprob"]}}, "gird: Extra inputs are not permitted"),
])
def test_bad_sweep_fails_before_anything_runs(tmp_path, base_config, fields, message):
    path = write_sweep(tmp_path, base_config, **fields)
    with pytest.raises(ConfigError, match=message):
        run_sweep(path)
    assert not (tmp_path / "sweep").exists()


def test_slurm_array_path_through_submitit_local_cluster(tmp_path, base_config):
    """The job-array submission, exercised with submitit's local cluster (no SLURM here)."""
    path = write_sweep(tmp_path, base_config, grid={"reward.name": ["target_logprob"]}, overrides=["train.steps=1"],
                       executor="slurm", slurm={"cluster": "local", "partition": "gpu", "timeout_min": 10})
    from rntp.experiments.sweep import submit_slurm

    sweep = load_sweep(path)
    jobs = submit_slurm(sweep, plan(sweep))
    assert [job.result() for job in jobs] == [0]
    assert (tmp_path / "sweep" / "name-target_logprob" / "checkpoints" / "latest").exists()
