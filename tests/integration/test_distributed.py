"""Two processes over gloo under torchrun: every backend matches a one-process step; end to end
with a vLLM engine per rank kept in sync; sharded save and exact resume; SIGTERM checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from rollout.vllm_utils import vllm_available

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
WORKER = str(Path(__file__).with_name("dist_worker.py"))
# The repository first, then whatever PYTHONPATH held: on a bare GPU machine that is the kit's folder
# (launch/gpu_check.sh), which the ranks need as much as the test does.
PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def torchrun(*args, nproc=2, timeout=600, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, **popen)
    for _attempt in range(2):
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        # Retry once only when the launch itself failed (a port or connection race on loopback),
        # never for an error of the code under test.
        if done.returncode == 0 or not any(s in done.stderr for s in LAUNCH_ERRORS):
            break
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


LAUNCH_ERRORS = ("RendezvousConnectionError", "RendezvousTimeoutError", "Address already in use",
                 "Connection reset by peer", "connectFullMesh")


@pytest.fixture(scope="module")
def one_process_step(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.pt"
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    subprocess.run([sys.executable, WORKER, "step", "--model", str(tiny_model_dir), "--out", str(out)], env=env,
                   cwd=ROOT, check=True, capture_output=True)
    return torch.load(out)


@pytest.mark.parametrize("backend, zero", [("ddp", 2), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3),
                                           ("fsdp2", 2)])
def test_two_ranks_match_one_process_on_the_same_global_batch(backend, zero, one_process_step, tiny_model_dir,
                                                              tmp_path):
    out = tmp_path / "two.pt"
    torchrun(WORKER, "step", "--model", str(tiny_model_dir), "--backend", backend, "--zero", str(zero),
             "--out", str(out))
    two = torch.load(out)
    # The gradient norm catches a wrong loss scale, which Adam's update alone would hide.
    assert two["stats"]["optim/grad_norm"] == pytest.approx(one_process_step["stats"]["optim/grad_norm"], rel=1e-5)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for name, ref in one_process_step["state"].items():
        assert not torch.equal(ref, initial[name]) or ref.abs().sum() == 0 or "norm" in name
        torch.testing.assert_close(two["state"][name], ref, rtol=0, atol=1e-5, msg=name)


def test_ddp_all_reduces_once_per_optimizer_step(one_process_step, tiny_model_dir, tmp_path):
    """Gradients accumulate locally over a step's micro-passes (DDP's no_sync) and are all-reduced
    once, in the last backward; the step equals a one-process step all the same."""
    out = tmp_path / "two.pt"
    torchrun(WORKER, "step", "--model", str(tiny_model_dir), "--backend", "ddp", "--count-all-reduces",
             "--out", str(out))
    two = torch.load(out)
    assert two["passes"] > 1 and two["reduced"]  # several micro-passes, and some buckets reduced
    assert set(two["reduced"]) == {two["passes"] - 1}, two["reduced"]  # every reduction in the last pass
    assert two["stats"]["optim/grad_norm"] == pytest.approx(one_process_step["stats"]["optim/grad_norm"], rel=1e-5)
    for name, ref in one_process_step["state"].items():
        torch.testing.assert_close(two["state"][name], ref, rtol=0, atol=1e-5, msg=name)


def train_args(tiny_model_dir, corpus_file, run_dir, *extra):
    return ["-m", "rntp", "train", f"model.name_or_path={tiny_model_dir}", f"data.source={corpus_file}",
            "data.chunk_tokens=64", "data.min_context=16", "data.horizon=4", "rollout.group_size=4",
            "rollout.max_thought_tokens=6", "train.positions_per_step=4", "train.micro_batch=8",
            "log.wandb_mode=disabled", "log.progress=false", "log.plot=false", "rollout.tag_tokens=text",
            f"run_dir={run_dir}", *extra]


def rows(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_two_ranks_with_a_vllm_engine_each_stay_in_sync(tiny_model_dir, corpus_file, tmp_path):
    torchrun(*train_args(tiny_model_dir, corpus_file, tmp_path / "run", "rollout.sampler=vllm", "dist.backend=ddp",
                         "train.steps=2", "rollout.check_sync_every=1", "optim.lr=1e-2",
                         "rollout.vllm.kv_cache_gb=1"))
    history = rows(tmp_path / "run")
    assert [r["step"] for r in history] == [1, 2]
    # every rank's engine gives the trainer's log-probs after each weight push (max over ranks)
    assert all(r["sync/max_logprob_diff"] < 1e-3 for r in history)
    assert history[-1]["optim/grad_norm"] > 0


@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_two_ranks_share_one_tensor_parallel_vllm_engine(tiny_model_dir, corpus_file, tmp_path):
    # One engine sharded over both ranks (TP=2); each rank's prompts go in one pooled call, and the
    # sampler checks that every rank gets its own prompts' completions back.
    torchrun(*train_args(tiny_model_dir, corpus_file, tmp_path / "run", "rollout.sampler=vllm",
                         "rollout.vllm.tensor_parallel_size=2", "dist.backend=deepspeed", "dist.zero_stage=3",
                         "train.steps=2", "rollout.check_sync_every=1", "optim.lr=1e-2", "rollout.vllm.kv_cache_gb=1"))
    history = rows(tmp_path / "run")
    assert [r["step"] for r in history] == [1, 2]
    assert all(r["sync/max_logprob_diff"] < 1e-3 for r in history)
    assert history[-1]["optim/grad_norm"] > 0


@pytest.mark.parametrize("backend", ["dist.backend=deepspeed dist.zero_stage=2", "dist.backend=fsdp2"])
def test_two_rank_save_and_resume_continue_identically(backend, tiny_model_dir, corpus_file, tmp_path):
    options = [*backend.split(), "rollout.sampler=hf", "train.steps=4", "train.save_every=2", "optim.lr=1e-3"]
    torchrun(*train_args(tiny_model_dir, corpus_file, tmp_path / "full", *options))
    half = tmp_path / "full" / "checkpoints" / "step_000002"
    state = torch.load(half / "trainer_state.pt", weights_only=False)
    assert len(state["ranks"]) == 2 and state["ranks"][0]["data"] != state["ranks"][1]["data"]
    torchrun(*train_args(tiny_model_dir, corpus_file, tmp_path / "resumed", *options, f"resume={half}"))
    full, resumed = rows(tmp_path / "full"), rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in ("reward/mean", "score/no_think", "optim/grad_norm", "optim/lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    end_a = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "checkpoints" / "step_000004")
    end_b = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "checkpoints" / "step_000004")
    for (name, p), q in zip(end_a.named_parameters(), end_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_sigterm_mid_run_leaves_a_loadable_checkpoint(tiny_model_dir, corpus_file, tmp_path):
    """As SLURM does on preemption: SIGTERM to every process of the job."""
    run_dir = tmp_path / "run"
    proc = torchrun(*train_args(tiny_model_dir, corpus_file, run_dir, "rollout.sampler=hf",
                                "dist.backend=deepspeed", "dist.zero_stage=3", "train.steps=500"),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and rows(run_dir)):
        time.sleep(1)
    assert rows(run_dir), "training never logged a step"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=300)
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = torch.load(latest / "trainer_state.pt", weights_only=False)
    assert 1 <= state["step"] < 500 and len(state["ranks"]) == 2
    model = AutoModelForCausalLM.from_pretrained(latest)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert yaml.safe_load((latest / "rntp_config.yaml").read_text())["dist"]["zero_stage"] == 3


def test_usr1_to_the_node_launcher_checkpoints_and_exits_cleanly(tiny_model_dir, corpus_file, tmp_path):
    """SLURM's warning signal, as the sbatch template forwards it: launch/node.sh passes it to the
    training processes, which checkpoint and exit 0, so the job can requeue and resume."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NPROC": "2", "MASTER_PORT": "29617", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable, "RUN_DIR": str(run_dir), "WANDB_MODE": "disabled"}
    args = train_args(tiny_model_dir, corpus_file, run_dir, "rollout.sampler=hf", "dist.backend=ddp",
                      "train.steps=500")[3:-1]  # drop "-m rntp train" and run_dir (node.sh adds them)
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "node.sh"), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and rows(run_dir)):
        time.sleep(1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    state = torch.load(run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
                       / "trainer_state.pt", weights_only=False)
    assert 1 <= state["step"] < 500


def test_usr1_to_the_whole_process_group_still_checkpoints_and_exits_cleanly(tiny_model_dir, corpus_file, tmp_path):
    """SLURM's warning to every process of the step, torchrun included (here: the launcher's process
    group; the trainers, in sessions of their own under torchrun, get it forwarded by node.sh).
    torchrun must not die of it (its default action), since srun's --kill-on-bad-exit would then
    kill the trainers mid-checkpoint; the trainers checkpoint and every process exits 0."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NPROC": "2", "MASTER_PORT": "29619", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable, "RUN_DIR": str(run_dir), "WANDB_MODE": "disabled"}
    args = train_args(tiny_model_dir, corpus_file, run_dir, "rollout.sampler=hf", "dist.backend=ddp",
                      "train.steps=500")[3:-1]  # drop "-m rntp train" and run_dir (node.sh adds them)
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "node.sh"), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and rows(run_dir)):
            time.sleep(1)
        assert rows(run_dir), "training never logged a step"
        os.killpg(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of the group may outlive the test
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out[-3000:]
    assert b"Traceback" not in out, out[-3000:]
    state = torch.load(run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
                       / "trainer_state.pt", weights_only=False)
    assert 1 <= state["step"] < 500 and len(state["ranks"]) == 2

def test_ddp_runs_end_without_hanging_on_the_process_group(tiny_model_dir, tmp_path):
    """DDP's reducer holds the gloo group from C++; if it drops the last reference (the engine freed after
    the group was destroyed), gloo's destructor joins its worker threads with the GIL held while one of
    them waits for the GIL to free the final barrier's work: the run hangs after its last checkpoint
    (seen in CI as a USR1 test timing out; pytorch/pytorch#56297). 60 ends in a row, each after the object
    collectives a checkpoint ends with; before the engine was closed first, 30 hung in 2 runs of 3."""
    out = tmp_path / "ends.txt"
    torchrun(WORKER, "ends", "--model", str(tiny_model_dir), "--backend", "ddp", "--rounds", "60", "--out", str(out),
             timeout=240)
    assert out.read_text() == "60 rounds"


def test_rntp_collectives_travel_on_its_own_group_whoever_made_the_default(tiny_model_dir, tmp_path):
    """Two ranks whose default group serves CUDA tensors alone (NCCL's case, emulated): metrics, objects
    and barriers still meet, on RNTP's own gloo group, and leaving destroys every group."""
    out = tmp_path / "collectives.txt"
    torchrun(WORKER, "collectives", "--model", str(tiny_model_dir), "--out", str(out), timeout=120)
    assert out.read_text() == repr(([3.0, 1.0], [{"rank": 0}, {"rank": 1}], "from rank 0", False))


@pytest.fixture(scope="module")
def layered_model_dir(tmp_path_factory):
    """A model whose weights are nearly all in its decoder layers (six of them), as in large models:
    a rank holding more than its share shows in the count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("layered")
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("backend, zero", [("fsdp2", 2), ("deepspeed", 3)])
def test_sharded_backends_never_hold_the_whole_model_on_other_ranks(backend, zero, layered_model_dir, tmp_path):
    """A 70B model does not fit on one GPU: under FSDP2 and ZeRO-3 a rank other than 0 must never hold
    the full parameters, neither while loading nor when a checkpoint is consolidated (rank 0 writes it)."""
    out = tmp_path / "weights.pt"
    torchrun(WORKER, "load", "--model", str(layered_model_dir), "--backend", backend, "--zero", str(zero),
             "--out", str(out))
    full = AutoModelForCausalLM.from_pretrained(layered_model_dir)
    total = sum(p.numel() for p in full.parameters())
    other = json.loads((tmp_path / "weights.pt.rank1.json").read_text())
    assert other["peak_held"] < 0.6 * total, other  # its half, and one layer at a time at most
    assert other["held_after"] <= total // 2 + 1024
    assert other["consolidated"] == 0  # no full state dict built off rank 0
    main = json.loads((tmp_path / "weights.pt.rank0.json").read_text())
    assert main["held_after"] <= total // 2 + 1024
    state = torch.load(out)
    for name, p in full.state_dict().items():  # rank 0's shards plus the broadcast ones: the checkpoint
        torch.testing.assert_close(state[name], p, rtol=0, atol=0, msg=name)
