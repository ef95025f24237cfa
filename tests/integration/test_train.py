"""The loop end to end on the tiny model: metrics, checkpoints, exact resume, bad input."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rewards import REWARDS, register_reward
from rntp.checkpoint import find_checkpoint, load_trainer_state
from rntp.cli import main
from rntp.train import train

pytestmark = pytest.mark.integration

DESIGN_METRICS = [
    "reward/mean", "reward/std", "score/with_think", "score/no_think", "info_gain", "groups/zero_spread_frac",
    "thought/len_mean", "thought/truncated_frac", "loss/clip_frac", "policy/entropy", "optim/grad_norm",
    "optim/lr", "tokens_per_s/sample", "tokens_per_s/score", "tokens_per_s/update", "memory/peak_gb",
    "time/sample", "time/score", "time/update", "time/sync",
]

if "test_nan_first_group" not in REWARDS:
    @register_reward("test_nan_first_group", "r = target_logprob, NaN for group 0 (test only)")
    def nan_first_group(x):
        r = x.target_logprobs.sum(-1).clone()
        r[x.group == 0] = float("nan")
        return r


def rows(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_train_writes_metrics_and_a_loadable_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config("train.steps=2", "grpo.kl_coef=0.05", "grpo.nll_coef=0.1", "grpo.epochs=2",
                      "grpo.advantage_scale=batch",
                      "log.plot=true", "optim.schedule=cosine", "optim.warmup_steps=1")
    ckpt = train(cfg)
    history = rows(tmp_path / "run")
    assert [r["step"] for r in history] == [1, 2]
    for key in DESIGN_METRICS + ["loss/kl", "loss/nll"]:
        assert history[-1][key] is not None, key
    # info gain is the difference of the two scores
    last = history[-1]
    assert last["info_gain"] == pytest.approx(last["score/with_think"] - last["score/no_think"], abs=1e-5)
    assert ckpt.name == "step_000002" and (tmp_path / "run" / "training.png").exists()
    model = AutoModelForCausalLM.from_pretrained(ckpt)  # plain transformers can load it
    assert any(ckpt.glob("*.safetensors"))
    state = load_trainer_state(ckpt)
    assert state["step"] == 2 and {"optimizer", "scheduler", "ranks"} <= set(state)
    assert len(state["ranks"]) == 1 and {"data", "rng"} <= set(state["ranks"][0])
    # the trained weights differ from the initial ones
    initial = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert samples and {"context_tail", "thought", "target", "reward"} <= set(samples[0])


def resumed_halfway(tiny_config, tmp_path, *overrides: str) -> tuple[list[dict], list[dict]]:
    """A 4-step run saved every 2 steps (`full`) and one resumed from its step-2 checkpoint (`resumed`): the
    metrics rows of steps 3 and 4 of each."""
    common = ("train.steps=4", "train.save_every=2", *overrides)
    train(tiny_config(*common, f"run_dir={tmp_path / 'full'}"))
    half = find_checkpoint(tmp_path / "full" / "checkpoints" / "step_000002")
    train(tiny_config(*common, f"run_dir={tmp_path / 'resumed'}", f"resume={half}"))
    full, resumed = rows(tmp_path / "full")[2:], rows(tmp_path / "resumed")
    assert [r["step"] for r in full] == [r["step"] for r in resumed] == [3, 4]
    return full, resumed


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
def test_resume_reproduces_an_uninterrupted_run(tiny_config, tmp_path, aggregation):
    full, resumed = resumed_halfway(tiny_config, tmp_path, f"grpo.loss_aggregation={aggregation}", "optim.lr=1e-3")
    for a, b in zip(full, resumed):
        for key in ("reward/mean", "score/no_think", "info_gain", "optim/grad_norm", "thought/len_mean", "optim/lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    end_full = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "checkpoints" / "step_000004")
    end_resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "checkpoints" / "step_000004")
    for (name, p), q in zip(end_full.named_parameters(), end_resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_in_the_same_run_dir_keeps_history(tiny_config, tmp_path):
    train(tiny_config("train.steps=2", "train.save_every=1"))
    train(tiny_config("train.steps=3", f"resume={tmp_path / 'run'}"))  # a run dir resumes from its latest
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2, 3]


def test_nonfinite_rewards_drop_their_group_and_never_reach_the_optimizer(tiny_config, tmp_path):
    train(tiny_config("reward.name=test_nan_first_group", "train.steps=2"))
    history = rows(tmp_path / "run")
    assert [r["groups/dropped_nonfinite"] for r in history] == [1, 2]
    assert all(math.isfinite(r["optim/grad_norm"]) for r in history)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step_000002")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cli_reports_bad_input_before_loading_a_model(tiny_config, capsys, tmp_path):
    assert main(["train", "train.stepz=3"]) == 2
    assert "train.stepz: Extra inputs are not permitted" in capsys.readouterr().err
    assert main(["train", "reward.name=nope", "log.wandb_mode=disabled"]) == 2
    assert "unknown reward 'nope'; registered rewards:" in capsys.readouterr().err
    assert main(["train", f"model.name_or_path={tmp_path / 'no-such-model'}", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "model path does not exist" in capsys.readouterr().err
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "empty-model" / "config.json").write_text("{}")
    assert main(["train", f"model.name_or_path={tmp_path / 'empty-model'}", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "has no weights" in capsys.readouterr().err


@pytest.mark.parametrize("options", [
    ("reward.name=info_gain", "reward.baseline=ema", "reward.ema_decay=0.5"),
    ("reward.name=vrcli", "reward.baseline=initial", "data.position_policy=entropy"),
    ("reward.weights={target_logprob_mean: 1.0, greedy_streak: 0.5}", "grpo.min_group_std=1e6",
     "grpo.drop_negative_advantages=true"),
])
def test_reward_baselines_position_policy_and_dynamic_sampling_run(tiny_config, tmp_path, options):
    train(tiny_config("train.steps=2", "train.save_every=1", *options))
    history = rows(tmp_path / "run")
    if "reward.baseline=ema" in options:
        # step 1: the EMA teacher equals the policy before the first update, so the scores agree
        assert history[0]["score/baseline"] == pytest.approx(history[0]["score/no_think"], abs=1e-5)
        assert history[1]["score/baseline"] != pytest.approx(history[1]["score/no_think"], abs=1e-7)
        state = load_trainer_state(tmp_path / "run" / "checkpoints" / "step_000002")
        assert "ema" in state
        train(tiny_config("train.steps=3", f"resume={tmp_path / 'run'}", *options))  # EMA state resumes
    if "grpo.min_group_std=1e6" in options:  # every group is below the spread threshold
        assert [r["groups/dropped_low_spread"] for r in history] == [2, 4]
        assert "optim/grad_norm" not in history[0]


def test_a_reward_from_the_users_own_module(tiny_config, tmp_path, monkeypatch):
    (tmp_path / "my_reward_module.py").write_text(
        "from rewards import register_reward\n\n"
        "@register_reward('user_surprise', 'r = -max_h log p(y_h)')\n"
        "def surprise(x):\n    return -x.target_logprobs.max(-1).values\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    train(tiny_config("train.steps=1", "reward.name=user_surprise", "reward.modules=[my_reward_module]"))
    assert rows(tmp_path / "run")[0]["reward/mean"] is not None


TIMINGS = ("time/", "tokens_per_s/", "memory/", "async/")


def test_a_default_group_made_for_cuda_alone_as_vllm_makes_it_changes_nothing(tiny_config, tmp_path):
    """On a GPU, vLLM's in-process engine makes the default process group itself, NCCL only. A
    "cuda:gloo" group serves the cuda device type alone as NCCL does, so a CPU tensor's collective on it
    raises as it would there: a run in a world of one must not use it, and must train as without it."""
    import torch.distributed as dist

    from rollout.net import free_port

    train(tiny_config(f"run_dir={tmp_path / 'plain'}", "eval.every=1", "eval.num_positions=2"))
    dist.init_process_group("cuda:gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.zeros(1))  # the condition is real: this group cannot reduce a CPU tensor
        train(tiny_config(f"run_dir={tmp_path / 'vllm_group'}", "eval.every=1", "eval.num_positions=2"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    plain, beside = rows(tmp_path / "plain"), rows(tmp_path / "vllm_group")
    assert [r["step"] for r in beside] == [r["step"] for r in plain] == [0, 1, 2]
    for a, b in zip(plain, beside):
        assert {k: v for k, v in a.items() if not k.startswith(TIMINGS)} == \
            {k: v for k, v in b.items() if not k.startswith(TIMINGS)}
