"""Asynchronous rollouts (`rollout.max_staleness`) against a real `rntp serve` on loopback: the batch
of step t is sampled by the weights after step t - 1 - k (version tags, and the sampler's log-probs
re-scored against the checkpoint of those weights), and a run killed with a batch in flight resumes
into the uninterrupted run's steps."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollout.vllm_utils import vllm_available
from tests.integration.test_distributed import ROOT, WORKER, rows, torchrun, train_args
from tests.integration.test_server import SERVE, shared_secret, start_server, stop_server  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")]
DETERMINISTIC = ("reward/mean", "reward/std", "score/with_think", "score/no_think", "loss/policy", "optim/grad_norm",
                 "thought/len_mean", "mismatch/mean_abs_log_ratio", "async/staleness_mean")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    proc, url = start_server(tiny_model_dir, tmp_path_factory.mktemp("server") / "server.log", *SERVE)
    yield url
    stop_server(proc)


def overrides(url, run_dir, lag, *extra):
    return [f"run_dir={run_dir}", "rollout.sampler=server", f"rollout.server.urls=[{url}]",
            "rollout.server.weight_transfer=gloo", f"rollout.max_staleness={lag}", "optim.lr=1e-2", *extra]


@pytest.mark.parametrize("lag", [1, 2])
def test_each_batch_is_sampled_by_the_weights_after_step_t_minus_1_minus_k(lag, server, tiny_config, tmp_path,
                                                                            monkeypatch):
    import rntp.train
    from rntp.forward.scoring import score_groups
    from rntp.train import train

    seen = {}
    update_step = rntp.train.update_step

    def recording(run, positions, rollouts, scored, adv):
        seen[len(seen) + 1] = ([p.context for p in positions], [p.target for p in positions], rollouts)
        return update_step(run, positions, rollouts, scored, adv)

    monkeypatch.setattr(rntp.train, "update_step", recording)
    run_dir = tmp_path / "run"
    train(tiny_config(*overrides(server, run_dir, lag, "train.steps=5", "train.save_every=1")))
    history = rows(run_dir)

    def weights(version):  # the weights after step `version`: its checkpoint (0: the initial model)
        path = run_dir / "checkpoints" / f"step_{version:06d}" if version else tiny_config().model.name_or_path
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    for step, (contexts, targets, rollouts) in seen.items():
        version = max(0, step - 1 - lag)
        assert {r.policy_version for r in rollouts} == {version}
        assert history[step - 1]["async/staleness_max"] == step - 1 - version
        gaps = {}
        for v in {version, step - 1}:  # the sampler's log-probs are those of version v, not of the latest
            scored = score_groups(weights(v), contexts, rollouts, targets, pad_id=0, micro_batch=8)
            mask = scored.batch.thought_mask
            gaps[v] = float((scored.thought_logprobs[mask] - scored.behaviour_logprobs[mask]).abs().max())
        assert gaps[version] < 1e-4, (step, gaps)
        if version != step - 1:
            assert gaps[step - 1] > 1e-3, (step, gaps)  # the weights moved: the check could fail
    assert all(r["async/trainer_idle_s"] >= 0 and r["async/sampler_idle_s"] >= 0 for r in history)


def test_no_transfer_starts_before_every_ranks_requests_have_finished(server, tiny_model_dir, tmp_path):
    """Two ranks share a server and sample ahead; rank 1's requests are slow. vLLM's weight routes do not
    pause requests, and a layer-wise reload empties each layer while it loads: rank 0 must not start the
    transfer while rank 1's batch still runs there. Every rank drains, all meet, then the push starts."""
    import json

    out = tmp_path / "times.json"
    torchrun(WORKER, "push", "--model", str(tiny_model_dir), "--url", server, "--out", str(out), timeout=300)
    ranks = json.loads(out.read_text())
    assert [len(r["ended"]) for r in ranks] == [2, 2] and len(ranks[0]["pushed"]) == 1
    last_request = max(t for r in ranks for t in r["ended"])
    assert ranks[0]["pushed"][0] >= last_request


def test_two_fsdp2_ranks_sampling_ahead_from_a_server_complete_their_steps(server, tiny_model_dir, corpus_file,
                                                                            tmp_path):
    """FSDP2 gathers the full weights collectively while rank 0 sends them: no rank may still wait for a
    server busy receiving them (configs/gpu/server-mode.yaml's set-up, k = 1)."""
    torchrun(*train_args(tiny_model_dir, corpus_file, tmp_path / "run", "dist.backend=fsdp2", "train.steps=2",
                         *overrides(server, tmp_path / "run", 1)[1:]), timeout=300)
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2]


def run_cli(args, **popen):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "rntp", "train", *args], cwd=ROOT, env=env, **popen)


def test_sigkill_with_a_batch_in_flight_resumes_into_the_same_steps(server, tiny_model_dir, corpus_file, tmp_path):
    common = [f"model.name_or_path={tiny_model_dir}", f"data.source={corpus_file}", "data.chunk_tokens=64",
              "data.min_context=16", "data.horizon=4", "rollout.tag_tokens=text", "rollout.group_size=4",
              "rollout.max_thought_tokens=6", "train.positions_per_step=2", "train.steps=5", "train.save_every=1",
              "log.wandb_mode=disabled", "log.progress=false", "log.plot=false"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_cli([*common, *overrides(server, whole, 1)]).wait(600) == 0
    proc = run_cli([*common, *overrides(server, killed, 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not (latest.exists() and latest.read_text().strip().endswith("step_000002")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # after step 2's push, step 4's batch is sampling
    proc.wait(60)
    assert run_cli([*common, *overrides(server, killed, 1), f"resume={killed}"]).wait(600) == 0
    expect, got = rows(whole), rows(killed)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(expect, got):
        assert {k: a[k] for k in DETERMINISTIC if k in a} == {k: b[k] for k in DETERMINISTIC if k in b}, a["step"]
    saved = torch.load(Path(killed) / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False)
    assert sorted(saved["ranks"][0]["ahead"]) == [3]  # the finished batch ahead travelled in the checkpoint
