"""Sweeps: which designs train identically (claims checked against rntp.grpo's advantages on the real
reward functions), the warning, runs side by side on disjoint GPUs, one launch per node under SLURM."""

import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml

from rewards import RewardInputs, apply_reward_config
from rntp import grpo
from rntp.experiments.compare import design_settings
from rntp.config import ConfigError, load_config
from rntp.experiments.sweep import (equivalence_warnings, load_sweep, plan, run_local, slurm_task, submit_slurm,
                        training_signature)

pytestmark = pytest.mark.unit

# designs as overrides; `s0` says which no-think scores the baseline gives (two different models)
DESIGNS = {
    "logprob": ["reward.name=target_logprob"],
    "logprob-mean": ["reward.name=target_logprob_mean"],
    "gain-policy": ["reward.name=info_gain", "reward.baseline=policy"],
    "gain-ema": ["reward.name=info_gain", "reward.baseline=ema"],
    "gain-ema-clipped": ["reward.name=info_gain", "reward.baseline=ema", "reward.clip_max=-1.0"],
    "gain-policy-clipped": ["reward.name=info_gain", "reward.baseline=policy", "reward.clip_max=-1.0"],
    "logprob-penalised": ["reward.name=target_logprob", "reward.length_penalty=0.3"],
    "logprob-mean-penalised": ["reward.name=target_logprob_mean", "reward.length_penalty=0.3"],
    "gain-penalised": ["reward.name=info_gain", "reward.length_penalty=0.3"],
    "logprob-ema": ["reward.name=target_logprob", "reward.baseline=ema"],  # a baseline it never reads
    "vrcli-policy": ["reward.name=vrcli", "reward.baseline=policy"],
    "vrcli-ema": ["reward.name=vrcli", "reward.baseline=ema"],
}
SCALES = ["group", "batch", "none"]


def batch(seed=0, groups=6, g=4, horizon=5):
    gen = torch.Generator().manual_seed(seed)
    n = groups * g
    group = torch.arange(groups).repeat_interleave(g)
    logp = -torch.rand(n, horizon, generator=gen) * 3
    s0 = {"policy": -torch.rand(groups, horizon, generator=gen) * 3,
          "ema": -torch.rand(groups, horizon, generator=gen) * 3 - 0.5}
    lengths = torch.randint(0, 9, (n,), generator=gen).tolist()
    return group, logp, s0, lengths


def advantages_of(overrides, scale, data):
    group, logp, s0, lengths = data
    cfg = load_config(None, [*overrides, f"grpo.advantage_scale={scale}"])
    x = RewardInputs(target_ids=torch.zeros_like(logp, dtype=torch.long), target_logprobs=logp,
                     no_think_logprobs=s0[cfg.reward.baseline if cfg.reward.baseline != "initial" else "ema"][group],
                     target_pred=torch.zeros_like(logp, dtype=torch.long), thought_ids=[[7] * n for n in lengths],
                     closed=torch.ones(len(lengths), dtype=torch.bool), group=group, options=cfg.reward)
    rewards = apply_reward_config(cfg.reward, x).double()
    return grpo.advantages(rewards, group, scale=scale).values, cfg


def signature(cfg):
    same, scaled, _ = training_signature(design_settings(cfg.model_dump(mode="json")))
    return json.dumps(same, sort_keys=True, default=str), json.dumps(scaled, sort_keys=True, default=str)


def test_the_equivalence_claims_hold_on_the_advantages_and_only_there():
    """Every pair of designs x scales, on two batches: an equal signature gives equal advantages, a scaled
    one advantages one constant factor apart (the same on both batches), and a different one advantages
    that are not (so nothing is claimed that the numbers do not show, and no equivalence the numbers show
    is missed in this family). `batch` against `none` is a factor per batch (its std), not a constant."""
    data = [batch(seed=0), batch(seed=1)]
    rows = [(f"{name}/{scale}", torch.cat([advantages_of(overrides, scale, d)[0] for d in data]),
             advantages_of(overrides, scale, data[0])[1]) for name, overrides in DESIGNS.items() for scale in SCALES]
    half = len(rows[0][1]) // 2
    seen = {"same": 0, "scaled": 0, "distinct": 0}
    for (a, adv_a, cfg_a), (b, adv_b, cfg_b) in itertools.combinations(rows, 2):
        (same_a, scaled_a), (same_b, scaled_b) = signature(cfg_a), signature(cfg_b)
        factor = (adv_a[:half] / adv_b[:half]).median()
        proportional = bool(torch.allclose(adv_a, factor * adv_b, rtol=1e-4, atol=1e-5))
        if same_a == same_b:
            seen["same"] += 1
            torch.testing.assert_close(adv_a, adv_b, rtol=1e-4, atol=1e-5, msg=f"{a} vs {b}")
        elif scaled_a == scaled_b:
            seen["scaled"] += 1
            assert proportional and not torch.allclose(adv_a, adv_b, rtol=1e-3, atol=1e-4), f"{a} vs {b}"
        else:
            seen["distinct"] += 1
            assert not proportional, f"{a} vs {b}: equal advantages up to a factor, but not flagged"
    assert seen["same"] >= 20 and seen["scaled"] >= 4 and seen["distinct"] > 100, seen


def test_worked_claims():
    """The named cases, directly: under group and batch, target_logprob, target_logprob_mean and info_gain
    (either baseline) give one set of advantages; under none, info_gain (either baseline) is
    target_logprob_mean's and target_logprob is H times it; clipping info_gain makes its baseline matter."""
    data = batch(seed=3)
    H = data[1].shape[1]
    for scale in ("group", "batch"):
        ref, _ = advantages_of(DESIGNS["logprob"], scale, data)
        for name in ("logprob-mean", "gain-policy", "gain-ema"):
            torch.testing.assert_close(advantages_of(DESIGNS[name], scale, data)[0], ref, rtol=1e-4, atol=1e-5)
    mean, _ = advantages_of(DESIGNS["logprob-mean"], "none", data)
    torch.testing.assert_close(advantages_of(DESIGNS["gain-ema"], "none", data)[0], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(advantages_of(DESIGNS["logprob"], "none", data)[0], H * mean, rtol=1e-5, atol=1e-5)
    clipped = [advantages_of(DESIGNS[n], "group", data)[0] for n in ("gain-ema-clipped", "gain-policy-clipped")]
    assert (clipped[0] - clipped[1]).abs().max() > 0.1


def write_sweep(tmp_path, runs, scale="group", **fields):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"train": {"steps": 1}, "grpo": {"advantage_scale": scale}}))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": str(base), "out_dir": str(tmp_path / "out"),
                                    "runs": [{"name": n, "overrides": o} for n, o in runs.items()],
                                    "seeds": [0, 1], **fields}))
    return path


def test_the_warning_names_each_pair_of_designs_that_train_identically(tmp_path, capsys):
    runs = {"logprob": ["reward.name=target_logprob"], "mean": ["reward.name=target_logprob_mean"],
            "gain-ema": ["reward.name=info_gain", "reward.baseline=ema"],
            "accuracy": ["reward.name=next_token_accuracy"],
            "control": ["grpo.pg_coef=0"], "control-acc": ["grpo.pg_coef=0", "reward.name=next_token_accuracy"]}
    lines = equivalence_warnings(plan(load_sweep(write_sweep(tmp_path, runs))))
    pairs = {tuple(line.split(" train identically")[0].split()[2::2]) for line in lines}
    assert pairs == {("logprob", "mean"), ("logprob", "gain-ema"), ("mean", "gain-ema"), ("control", "control-acc")}
    assert all(line.startswith("warning: ") and "\n" not in line for line in lines)
    assert "H cancels" in next(line for line in lines if "logprob and mean" in line)
    assert "any reward.baseline" in next(line for line in lines if "mean and gain-ema" in line)
    # under advantage_scale=none: target_logprob is a constant factor away; info_gain still equals the mean
    lines = equivalence_warnings(plan(load_sweep(write_sweep(tmp_path, runs, scale="none"))))
    assert any("logprob and mean differ only by a constant factor" in line for line in lines)
    assert any("mean and gain-ema train identically" in line for line in lines)
    from rntp.experiments.sweep import run_sweep

    run_sweep(write_sweep(tmp_path, runs), dry_run=True)  # printed before anything runs
    assert "warning: designs logprob and mean train identically" in capsys.readouterr().out


def test_the_shipped_reward_sweep_holds_distinct_designs_a_control_and_three_seeds():
    runs = plan(load_sweep("configs/sweeps/rewards.yaml"))
    assert equivalence_warnings(runs) == []
    by_design = {}
    for r in runs:
        by_design.setdefault(r["name"].split("__")[0], set()).add(r["config"].train.seed)
    assert all(seeds == {0, 1, 2} for seeds in by_design.values())
    assert [r["config"].grpo.pg_coef for r in runs if r["name"].startswith("control")] == [0, 0, 0]


# ---- the local executor: side by side on disjoint GPUs ----------------------------------------------------

class FakeProcess:
    def __init__(self, events, name, polls):
        self.events, self.name, self.polls = events, name, polls

    def poll(self):
        self.polls -= 1
        if self.polls > 0:
            return None
        self.events.append(("end", self.name))
        return 0


@pytest.fixture
def launches(monkeypatch):
    events, started = [], []

    def fake_launch(cmd, log_path, env):
        name = Path(log_path).parent.name
        started.append({"name": name, "cmd": cmd, "devices": env.get("CUDA_VISIBLE_DEVICES")})
        events.append(("start", name))
        return FakeProcess(events, name, polls=2)

    monkeypatch.setattr("rntp.experiments.sweep._launch", fake_launch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return events, started


def two_runs(tmp_path, **fields):
    sweep = load_sweep(write_sweep(tmp_path, {"a": [], "b": ["reward.name=next_token_accuracy"]}, **fields))
    sweep.seeds = []
    return sweep, plan(sweep)


def test_two_runs_go_side_by_side_on_disjoint_gpus(tmp_path, monkeypatch, launches):
    events, started = launches
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    sweep, runs = two_runs(tmp_path, gpus_per_run=2)
    run_local(sweep, runs, poll_s=0)
    assert [e[0] for e in events] == ["start", "start", "end", "end"]  # both running at once
    assert [s["devices"] for s in started] == ["0,1", "2,3"]
    for s in started:  # torchrun with two processes and a rendezvous port of its own
        assert s["cmd"][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        assert s["cmd"][5:8] == ["-m", "rntp", "train"]
    assert {r["status"] for r in runs} == {"finished"}


def test_visible_devices_are_shared_out_as_named(tmp_path, monkeypatch, launches):
    events, started = launches
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7,9")
    sweep, runs = two_runs(tmp_path)
    run_local(sweep, runs, poll_s=0)
    assert [s["devices"] for s in started] == ["5", "7"] and [e[0] for e in events[:2]] == ["start", "start"]
    assert started[0]["cmd"][1:4] == ["-m", "rntp", "train"]  # one process: no torchrun


def test_without_gpus_runs_go_one_at_a_time(tmp_path, monkeypatch, launches):
    events, started = launches
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    sweep, runs = two_runs(tmp_path, gpus_per_run=2)
    run_local(sweep, runs, poll_s=0)
    assert [e[0] for e in events] == ["start", "end", "start", "end"]
    assert [s["devices"] for s in started] == [None, None]
    assert started[0]["cmd"][1:4] == ["-m", "rntp", "train"]


def test_more_gpus_per_run_than_visible_is_refused(tmp_path, monkeypatch, launches):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    sweep, runs = two_runs(tmp_path, gpus_per_run=4)
    with pytest.raises(ConfigError, match="gpus_per_run=4 but only 2 GPU"):
        run_local(sweep, runs, poll_s=0)
    assert launches[1] == []


# ---- SLURM: one launch per node ----------------------------------------------------------------------

class FakeJobEnv:
    def __init__(self, node):
        self.node, self.job_id, self.hostnames = node, "4242_3", ["gpu-a", "gpu-b"]


def test_a_two_node_array_task_starts_the_run_once_per_node_through_node_sh(tmp_path, monkeypatch):
    """Each node of the task runs launch/node.sh once with its own node rank and the same rendezvous
    (DRY_RUN=1 makes node.sh print the torchrun command it would run into the node's log)."""
    monkeypatch.setenv("DRY_RUN", "1")
    run_dir = tmp_path / "run"
    for node in (0, 1):
        assert slurm_task(["--config", "c.yaml", "train.steps=2"], str(run_dir), 4, 2, job_env=FakeJobEnv(node)) == 0
    logs = [(run_dir / "train.log").read_text(), (run_dir / "train.node1.log").read_text()]
    for node, text in enumerate(logs):
        (line,) = [x for x in text.splitlines() if x.startswith("node ")]  # one launch on this node
        assert f"--node-rank={node}" in line and "--nnodes=2" in line and "--nproc-per-node=4" in line
        assert "--rdzv-endpoint=gpu-a:" in line and "--rdzv-id=rntp-4242_3" in line
        assert line.endswith(f"-m rntp train --config c.yaml train.steps=2 run_dir={run_dir}")
    endpoint = [x.split("--rdzv-endpoint=")[1].split()[0] for x in logs]
    assert endpoint[0] == endpoint[1]


def test_submit_asks_for_one_task_per_node(tmp_path, monkeypatch):
    seen = {}

    class FakeExecutor:
        def __init__(self, folder, cluster):
            pass

        def update_parameters(self, **params):
            seen.update(params)

        def map_array(self, fn, *columns):
            seen["fn"], seen["columns"] = fn, columns
            return []

    monkeypatch.setattr("submitit.AutoExecutor", FakeExecutor)
    sweep = load_sweep(write_sweep(tmp_path, {"a": []}, executor="slurm", gpus_per_run=8,
                                   slurm={"nodes": 2, "gpus_per_node": 8}))
    submit_slurm(sweep, plan(sweep))
    assert seen["tasks_per_node"] == 1 and seen["nodes"] == 2 and seen["fn"] is slurm_task
    assert seen["columns"][2:] == ([8, 8], [2, 2])  # gpus per run, nodes: for each of the two seeds


def test_gpus_per_run_must_fit_a_slurm_node(tmp_path):
    with pytest.raises(ConfigError, match="slurm.gpus_per_node=1 is below gpus_per_run=2"):
        load_sweep(write_sweep(tmp_path, {"a": []}, executor="slurm", gpus_per_run=2))
