"""Server mode on CPU: a real vLLM server started by `rntp serve`, rollouts over HTTP, weights over
vLLM's weight-transfer API with the gloo backend, and two trainer ranks training against it. Every
server route but /health needs the shared secret (rollout.auth): this module's servers and trainers
share one through RNTP_SERVER_SECRET."""

import os
import secrets
import shutil
import subprocess
import sys
import time

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM

from rntp.forward.scoring import token_logprobs
from rntp.config import load_config
from rollout import SamplingSpec, ThinkTags, make_sampler
from rollout.base import WeightStream
from rollout.net import free_port
from rollout.vllm_utils import vllm_available
from tests.integration.test_distributed import ROOT, rows, torchrun, train_args

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")]
SERVE = ["data.chunk_tokens=64", "rollout.max_thought_tokens=6", "rollout.vllm.kv_cache_gb=1",
         "rollout.server.weight_transfer=gloo"]


def start_server(model_dir, log_path, *overrides, env=None):
    """`rntp serve` on a free local port; its URL once it answers (its log in the failure otherwise)."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rntp", "serve", "--host", "127.0.0.1", "--port", str(port),
                                 f"model.name_or_path={model_dir}", "rollout.tag_tokens=text", *overrides],
                                cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if requests.get(f"{url}/health", timeout=5).ok:
                return proc, url
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            pytest.fail("rntp serve did not come up:\n" + open(log_path).read()[-4000:])
        time.sleep(2)


@pytest.fixture(scope="module", autouse=True)
def shared_secret():
    """One secret for the servers and trainers of this module, in their environment."""
    with pytest.MonkeyPatch.context() as patch:
        secret = secrets.token_hex(32)
        patch.setenv("RNTP_SERVER_SECRET", secret)
        yield secret


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def opinionated_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a generation_config.json that asks for other sampling than ours, as
    released models' configs do: vLLM's completion route would fill each field a request leaves
    unset from it, and cap max_tokens at its max_new_tokens."""
    from transformers import GenerationConfig

    out = tmp_path_factory.mktemp("tiny-opinionated") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = GenerationConfig.from_pretrained(out) if (out / "generation_config.json").exists() else GenerationConfig()
    config.update(do_sample=True, top_k=2, min_p=0.3, repetition_penalty=1.5, max_new_tokens=3)
    config.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(opinionated_model_dir, tmp_path_factory):
    """A server on the tiny model's weights whose generation config would sample otherwise."""
    proc, url = start_server(opinionated_model_dir, tmp_path_factory.mktemp("server") / "server.log", *SERVE)
    yield url
    stop_server(proc)


def server_sampler(url, tokenizer, **server):
    cfg = load_config(None, ["rollout.sampler=server", f"rollout.server.urls=[{url}]",
                             *[f"rollout.server.{k}={v}" for k, v in server.items()]])
    return make_sampler("server", "", ThinkTags(tokenizer), server_cfg=cfg.rollout.server)


def stream_of(model) -> WeightStream:
    """The model's weights, tied names included, cut into buckets of about 1 MB: several broadcasts."""
    return WeightStream.of_module(model, bucket_mb=1.0)


def prompts_of(tokenizer, tags):
    return [tags.prompt(tokenizer.encode(t, add_special_tokens=False))
            for t in ("The value returned by the function is", "Each line of the file", "A list of names")]


def test_server_draws_the_thoughts_the_in_process_engine_draws(server, tiny_model_dir, tokenizer):
    remote = server_sampler(server, tokenizer)
    local = make_sampler("vllm", str(tiny_model_dir), ThinkTags(tokenizer), dtype="float32", max_model_len=256)
    try:
        spec = SamplingSpec(n=3, max_tokens=6, seed=7)
        prompts = prompts_of(tokenizer, remote.tags)
        ours, theirs = remote.sample(prompts, spec), local.sample(prompts, spec)
        assert [r.group for r in ours] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert all(r.prompt_ids == prompts[r.group] for r in ours)
        assert [r.thought_ids for r in ours] == [r.thought_ids for r in theirs]
        assert len({tuple(r.thought_ids) for r in ours}) > 1  # seeds differ per prompt and per sample
    finally:
        local.close()
        remote.close()


def test_server_reports_the_logprobs_it_sampled_from(server, tiny_model_dir, tokenizer):
    """Behaviour log-probs over HTTP (the server runs in processed_logprobs mode): the in-process
    engine's for the same thoughts, at temperature 0.8 and top-p 0.9."""
    remote = server_sampler(server, tokenizer)
    local = make_sampler("vllm", str(tiny_model_dir), ThinkTags(tokenizer), dtype="float32", max_model_len=256)
    try:
        spec = SamplingSpec(n=3, max_tokens=6, temperature=0.8, top_p=0.9, seed=4)
        prompts = prompts_of(tokenizer, remote.tags)
        ours, theirs = remote.sample(prompts, spec), local.sample(prompts, spec)
        assert [r.thought_ids for r in ours] == [r.thought_ids for r in theirs]
        for a, b in zip(ours, theirs):
            assert len(a.behaviour_logprobs) == a.n_sampled
            assert max(abs(x - y) for x, y in zip(a.behaviour_logprobs, b.behaviour_logprobs)) < 1e-4
    finally:
        local.close()
        remote.close()


def test_weights_pushed_over_gloo_reach_the_server(server, tiny_model_dir, tokenizer):
    sampler = server_sampler(server, tokenizer)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    seqs = [tokenizer.encode(t, add_special_tokens=False) for t in
            ("Each module returns a list of names.", "The default argument is the first value.")]
    ids = torch.tensor([seqs[0]])
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    (-token_logprobs(policy, ids, torch.ones_like(ids)).sum()).backward()  # one real training step
    optimizer.step()
    policy.eval()

    def gap():
        served = sampler.prompt_logprobs(seqs)
        worst = 0.0
        for seq, row in zip(seqs, served):
            seq_ids = torch.tensor([seq])
            with torch.no_grad():
                trainer = token_logprobs(policy, seq_ids, torch.ones_like(seq_ids))[0]
            worst = max(worst, (torch.tensor(row[1:]) - trainer).abs().max().item())
        return worst

    try:
        assert gap() > 1e-2  # the server still has the weights it started with
        sampler.push_weights(stream_of(policy))
        assert gap() < 1e-4
        sampler.push_weights(stream_of(policy))  # a second round over the same group
        assert gap() < 1e-4
    finally:
        sampler.close()


def test_two_ranks_train_against_a_server(server, tiny_model_dir, corpus_file, tmp_path):
    torchrun(*train_args(tiny_model_dir, corpus_file, tmp_path / "run", "rollout.sampler=server",
                         f"rollout.server.urls=[{server}]", "rollout.server.weight_transfer=gloo",
                         "dist.backend=deepspeed", "dist.zero_stage=3", "train.steps=2",
                         "rollout.check_sync_every=1", "optim.lr=1e-2"))
    history = rows(tmp_path / "run")
    assert [r["step"] for r in history] == [1, 2]
    # after each push (rank 0 sends the ZeRO-3-gathered weights) the server scores like the trainer
    assert all(r["sync/max_logprob_diff"] < 1e-3 for r in history)
    assert history[-1]["optim/grad_norm"] > 0


def test_a_missing_server_is_a_clear_error(tokenizer):
    from rollout.server import ServerError

    with pytest.raises(ServerError, match="no vLLM server answered at .*rntp serve"):
        server_sampler(f"http://127.0.0.1:{free_port()}", tokenizer, startup_timeout_s=1)


# -- access: the shared secret -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_weights_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with other weights: what an intruder's /collective_rpc would load."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    out = tmp_path_factory.mktemp("tiny-other") / "model"
    model.save_pretrained(out)
    return out


def test_without_the_secret_every_route_but_health_is_refused_and_changes_nothing(server, tokenizer,
                                                                                  other_weights_dir, shared_secret):
    """The requests an intruder on the network would send, without the secret or with a wrong one: 401
    each, and the next authenticated sample is the one an untouched server draws."""
    sampler = server_sampler(server, tokenizer)
    try:
        spec = SamplingSpec(n=3, max_tokens=6, seed=11)
        prompts = prompts_of(tokenizer, sampler.tags)
        before = [r.thought_ids for r in sampler.sample(prompts, spec)]
        model = sampler.model
        attacks = [
            ("POST", "/collective_rpc", {"method": "reload_weights",
                                         "kwargs": {"weights_path": str(other_weights_dir)}}),
            ("POST", "/init_weight_transfer_engine", {"init_info": {"master_address": "127.0.0.1", "master_port": 1,
                                                                    "rank_offset": 1, "world_size": 2}}),
            ("POST", "/update_weights", {"update_info": {"names": ["lm_head.weight"], "dtype_names": ["float32"],
                                                          "shapes": [[1]]}}),
            ("POST", "/start_weight_update", None), ("POST", "/finish_weight_update", None),
            ("POST", "/sleep?level=2", None), ("POST", "/wake_up", None), ("POST", "/reset_prefix_cache", None),
            ("POST", "/pause", None), ("GET", "/server_info", None), ("GET", "/get_world_size", None),
            ("GET", "/v1/models", None), ("GET", "/metrics", None),
            ("POST", "/v1/completions", {"model": model, "prompt": prompts[0], "max_tokens": 4}),
        ]
        for header in ({}, {"Authorization": "Bearer " + "0" * 64}, {"Authorization": shared_secret},
                       {"Authorization": f"Basic {shared_secret}"}):
            for method, path, body in attacks:
                answer = requests.request(method, server + path, json=body, headers=header, timeout=30)
                assert answer.status_code == 401, (path, header, answer.status_code, answer.text[:200])
        assert requests.get(f"{server}/health", timeout=10).status_code == 200  # open, for start-up waits
        state = requests.get(f"{server}/is_sleeping", headers={"Authorization": f"Bearer {shared_secret}"}, timeout=10)
        assert state.json() == {"is_sleeping": False}
        assert [r.thought_ids for r in sampler.sample(prompts, spec)] == before
    finally:
        sampler.close()


def test_a_weight_transfer_init_without_the_transfer_token_is_refused(server, shared_secret):
    """Past the route's secret too, the gloo workers join no group an init names without the token
    derived from the server's secret (here the group could never form: it would hang otherwise)."""
    answer = requests.post(f"{server}/init_weight_transfer_engine", timeout=60,
                           headers={"Authorization": f"Bearer {shared_secret}"},
                           json={"init_info": {"master_address": "127.0.0.1", "master_port": free_port(),
                                               "rank_offset": 1, "world_size": 2, "timeout_s": 30}})
    assert answer.status_code >= 400 and "refused an init" in answer.text
    assert requests.get(f"{server}/health", timeout=10).ok


def test_a_wrong_secret_on_the_trainer_is_one_line_naming_the_setting(server, tokenizer, tiny_model_dir,
                                                                     corpus_file, tmp_path):
    from rollout.server import ServerAuthError

    wrong = tmp_path / "secret"
    wrong.write_text(secrets.token_hex(32))
    wrong.chmod(0o600)
    with pytest.raises(ServerAuthError, match="answered 401.*rollout.server.secret_file") as refused:
        server_sampler(server, tokenizer, secret_file=wrong)
    assert "\n" not in str(refused.value) and str(wrong) in str(refused.value)
    done = subprocess.run([sys.executable, *train_args(tiny_model_dir, corpus_file, tmp_path / "run",
                                                       "rollout.sampler=server", f"rollout.server.urls=[{server}]",
                                                       "rollout.server.weight_transfer=gloo", "train.steps=1",
                                                       f"rollout.server.secret_file={wrong}")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    errors = [line for line in done.stderr.splitlines() if line.startswith("rntp train: error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(errors) == 1 and "answered 401" in errors[0] and "rollout.server.secret_file" in errors[0]
