"""LoRA (`model.lora`, `rntp/lora.py`) on the tiny model: the packed forward through a PEFT model,
only the adapter trains and is saved (PEFT format), the frozen views (base with the adapter off, the
adapter EMA), bit-identical resume, learning, merged export; 2-rank DDP and ZeRO-2 against one process.
vLLM (in-process and `rntp serve`) serving the pushed adapter is in the second half."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from rntp import lora
from rntp.checkpoint import load_trainer_state
from rntp.cli import main
from rntp.config import LoRAConfig, load_config
from rntp.forward.packing import build_packs, check_packed_forward, packed_logprobs
from rntp.publish import export
from rntp.train import follow, train
from rollout.vllm_utils import vllm_available
from tests.integration.test_distributed import WORKER, torchrun
# importing test_learning registers the test_upper_ids reward
from tests.integration.test_learning import HALF, one_layer_llama, rewards
from tests.integration.test_packing import chunk_positions, load64, loss_of, read, reference
from tests.integration.test_train import resumed_halfway, rows

pytestmark = pytest.mark.integration
LORA = ("model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8")


def wrapped64(model_dir, seed=0):
    """The float64 tiny model under a LoRA adapter (float64 too) whose lora_B is not zero, so that the
    adapter changes every output."""
    torch.manual_seed(seed)
    model = lora.wrap(load64(model_dir), LoRAConfig(enabled=True, rank=4, alpha=8)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    return model


# -- the packed forward on a PEFT model ---------------------------------------------------------------

@pytest.mark.parametrize("attention", ["blocks", "dense"])
@pytest.mark.parametrize("micro_batch", [2, 8])
def test_packed_logprobs_through_a_lora_model_equal_independent_sequences(attention, micro_batch, tiny_model_dir):
    model = wrapped64(tiny_model_dir).eval()
    assert model.config._attn_implementation == "sdpa"
    check_packed_forward(model)  # the start-up self-check takes it, and installs the packed attention
    assert model.base_model.model.config._attn_implementation == "rntp_packed"
    contexts, rollouts, targets = chunk_positions()
    got = {}
    with torch.no_grad():
        for _, pack in build_packs(contexts, rollouts, targets, micro_batch=micro_batch, no_think=True):
            out = packed_logprobs(model, pack, attention=attention, chunk=7)  # several head chunks
            got.update({("t", k): v for k, v in read(out, pack, lambda p: p.thoughts).items()})
            got.update({("y", k): v for k, v in read(out, pack, lambda p: p.targets).items()})
        for i, r in enumerate(rollouts):
            seq = r.prompt_ids + r.thought_ids + targets[r.group]
            torch.testing.assert_close(got["t", i], reference(model, seq, len(r.prompt_ids), r.n_sampled),
                                       rtol=0, atol=1e-10)
            torch.testing.assert_close(got["y", i], reference(model, seq, len(seq) - 4, 4), rtol=0, atol=1e-10)
        # and the adapter matters: the base gives other log-probs
        seq = rollouts[0].prompt_ids + rollouts[0].thought_ids
        assert (reference(model, seq, 5, 10) - reference(load64(tiny_model_dir), seq, 5, 10)).abs().max() > 1e-3


def test_adapter_gradients_through_shared_packs_equal_independent_sequences(tiny_model_dir):
    """Only the adapter gets gradients, and through shared packs they are those of unpacked sequences."""
    contexts, rollouts, targets = chunk_positions()
    gen = torch.Generator().manual_seed(2)
    w_thought = {i: torch.randn(8, generator=gen, dtype=torch.float64) for i in range(len(rollouts))}
    w_target = {i: torch.randn(4, generator=gen, dtype=torch.float64) for i in range(len(rollouts))}

    def grads(packed: bool):
        model = wrapped64(tiny_model_dir).train()
        total = 0
        if packed:
            for _, pack in build_packs(contexts, rollouts, targets, micro_batch=2):
                out = packed_logprobs(model, pack, temperature=0.8)
                total = total + loss_of(read(out, pack, lambda p: p.thoughts), w_thought) \
                    + loss_of(read(out, pack, lambda p: p.targets), w_target)
        else:
            for i, r in enumerate(rollouts):
                seq = r.prompt_ids + r.thought_ids + targets[r.group]
                logits = model(input_ids=torch.tensor([seq])).logits[0]
                hot, plain = torch.log_softmax(logits / 0.8, -1), torch.log_softmax(logits, -1)
                start = len(r.prompt_ids)
                th = torch.stack([hot[t - 1, seq[t]] for t in range(start, start + r.n_sampled)]) if r.n_sampled \
                    else hot[:0, 0]
                tg = torch.stack([plain[t - 1, seq[t]] for t in range(len(seq) - 4, len(seq))])
                total = total + (th * w_thought[i][: len(th)]).sum() + (tg * w_target[i]).sum()
        total.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared, ref = grads(True), grads(False)
    assert set(ref) == set(shared) and ref and all(".lora_A." in n or ".lora_B." in n for n in ref)
    for name, g in ref.items():
        assert ((shared[name] - g).abs().max() / g.abs().max().clamp(min=1e-30)) < 1e-9, name


def test_the_frozen_views_are_the_base_and_the_adapter_ema(tiny_model_dir):
    """BaseView computes the plain base model exactly (the adapter off, the policy untouched);
    AdapterEMA with the policy's own tensors computes the policy, and `follow` moves it by lerp."""
    policy = wrapped64(tiny_model_dir).train()
    base = load64(tiny_model_dir).eval()
    contexts, rollouts, targets = chunk_positions()
    (_, pack), = build_packs(contexts, rollouts, targets, micro_batch=8, no_think=True)
    with torch.no_grad():
        plain = packed_logprobs(base, pack).logp
        as_policy = packed_logprobs(policy.eval(), pack).logp
        policy.train()
        torch.testing.assert_close(packed_logprobs(lora.BaseView(policy), pack).logp, plain, rtol=0, atol=0)
        ema = lora.AdapterEMA(policy)
        torch.testing.assert_close(packed_logprobs(ema, pack).logp.double(), as_policy, rtol=0, atol=1e-12)
    assert policy.training and all(p.requires_grad for _, p in lora.trainable(policy))  # views leave it as it was
    moved = {k: v + 1.0 for k, v in ema.state_dict().items()}
    before = ema.state_dict()
    follow(ema, 0.25, list(moved.items()))
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, before[k] + 0.25 * (moved[k].float() - before[k]))


def test_peft_names_are_those_peft_saves(tiny_model_dir):
    from peft import get_peft_model_state_dict

    model = wrapped64(tiny_model_dir)
    saved = get_peft_model_state_dict(model)
    ours = dict(lora.trainable(model))
    assert set(saved) == set(ours) and all(torch.equal(saved[k], ours[k]) for k in ours)


# -- training -------------------------------------------------------------------------------------------

def test_a_lora_run_trains_and_saves_only_the_adapter(tiny_config, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    cfg = tiny_config(*LORA, "train.steps=2", "grpo.kl_coef=0.05", "reward.name=info_gain", "reward.baseline=ema",
                      "reward.ema_decay=0.5", "optim.lr=1e-2")
    ckpt = train(cfg)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert not (ckpt / "model.safetensors").exists()
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(tiny_model_dir)
    history = rows(tmp_path / "run")
    assert history[-1]["loss/kl"] > 0 and history[-1]["score/baseline"] is not None  # the KL ref and teacher ran
    # the base stays as it was; the adapter moved away from its start (lora_B = 0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(ckpt))
    for name, p in trained.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name.removeprefix("base_model.model.").replace(".base_layer", "")]), name
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    state = load_trainer_state(ckpt)
    assert len(state["optimizer"]["state"]) == len(adapter)  # Adam state for the adapter alone
    # the EMA teacher is an adapter too, moved half way (decay 0.5) towards the policy's at each push
    assert set(state["ema"]) == set(adapter)
    assert any(not torch.equal(state["ema"][k], adapter[k]) for k in adapter if "lora_B" in k)


def test_lora_resume_is_bit_identical(tiny_config, tmp_path):
    full, resumed = resumed_halfway(tiny_config, tmp_path, *LORA, "model.lora.dropout=0.1", "optim.lr=1e-2",
                                    "grpo.kl_coef=0.05", "reward.name=info_gain", "reward.baseline=ema",
                                    "reward.ema_decay=0.9", "data.position_policy=entropy")
    for a, b in zip(full, resumed):
        for key in ("reward/mean", "score/no_think", "score/baseline", "info_gain", "loss/kl", "loss/policy",
                    "optim/grad_norm", "thought/len_mean", "optim/lr"):
            assert b[key] == a[key], key
    ends = [tmp_path / run / "checkpoints" / "step_000004" for run in ("full", "resumed")]
    from safetensors.torch import load_file

    a, b = (load_file(e / "adapter_model.safetensors") for e in ends)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = (load_trainer_state(e)["ema"] for e in ends)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_resuming_across_lora_and_full_weights_is_one_line(tiny_config, tmp_path, capsys):
    train(tiny_config("train.steps=1"))
    code = main(["train", *tiny_overrides(tiny_config), f"run_dir={tmp_path / 'other'}", f"resume={tmp_path / 'run'}",
                 *LORA])
    assert code == 2 and "holds a whole model, not a LoRA adapter" in capsys.readouterr().err


def tiny_overrides(tiny_config):
    """The tiny config as overrides (for the CLI)."""
    cfg = tiny_config()
    return [f"model.name_or_path={cfg.model.name_or_path}", f"data.source={cfg.data.source}", "data.chunk_tokens=64",
            "data.min_context=16", "data.horizon=4", "rollout.sampler=hf", "rollout.tag_tokens=text",
            "rollout.group_size=4", "rollout.max_thought_tokens=6", "train.positions_per_step=2",
            "log.wandb_mode=disabled", "log.progress=false", "log.plot=false"]


@pytest.fixture(scope="module")
def learnable_by_lora_dir(tmp_path_factory, tokenizer):
    """A model that can learn the upper-half reward through adapters on its linear layers alone: the head
    reads feature 0 as +1 for upper-half ids and -1 for the rest, nothing writes feature 0 yet (its
    embeddings and every layer's output rows are zero), and feature 1 is a constant the adapters can map
    onto it. It starts at P(upper) = 1/2."""
    model = one_layer_llama(tokenizer)
    config = model.config
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.0
        model.model.embed_tokens.weight[:, 1] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[:, 0] = torch.where(torch.arange(config.vocab_size) >= HALF, 1.0, -1.0)
    out = tmp_path_factory.mktemp("learnable-lora")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_policy_learns_with_lora(tiny_config, learnable_by_lora_dir, tmp_path):
    cfg = tiny_config(f"model.name_or_path={learnable_by_lora_dir}", "reward.name=test_upper_ids", "train.steps=12",
                      "optim.lr=2e-2", "rollout.group_size=8", "train.positions_per_step=4", "train.micro_batch=32",
                      "rollout.max_thought_tokens=8", f"run_dir={tmp_path / 'learn'}", *LORA)
    train(cfg)
    r = rewards(tmp_path / "learn")
    start, end = sum(r[:3]) / 3, sum(r[-3:]) / 3
    assert 0.35 < start < 0.65, f"the model should start near 1/2, got {start:.3f}"
    assert end > start + 0.2, f"reward did not rise: {r}"


def test_a_merged_export_scores_as_the_adapter_on_its_base(tiny_config, tiny_model_dir, tmp_path):
    from peft import PeftModel

    from rntp.experiments.evaluate import run_eval

    ckpt = train(tiny_config(*LORA, "train.steps=1", "optim.lr=5e-2"))
    out = tmp_path / "merged"
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    # the cards: the checkpoint is an adapter on its base, the export a model merged from one
    from huggingface_hub import metadata_load

    assert metadata_load(ckpt / "README.md")["library_name"] == "peft"
    assert "A **LoRA adapter** (rank" in (ckpt / "README.md").read_text()
    assert metadata_load(out / "README.md")["library_name"] == "transformers"
    assert "**LoRA adapter** (rank" in (out / "README.md").read_text() and "merged into its weights" in (
        out / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no PEFT
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(ckpt))
    ids = torch.tensor([list(range(300, 360))])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=0, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert (merged(ids).logits - base(ids).logits).abs().max() > 1e-3
    assert main(["export", "--model", str(ckpt), "--out", str(out)]) == 2  # never into a folder that holds one
    # rntp eval merges the adapter checkpoint itself: the same numbers as the exported folder's
    cfg = tiny_config("eval.num_positions=4", "eval.thoughts=2", "eval.data=" + str(tiny_config().data.source),
                      "eval.split=train")
    a = run_eval([str(ckpt)], cfg, tmp_path / "eval_adapter", "hf")["results"][0]["metrics"]
    b = run_eval([str(out)], cfg, tmp_path / "eval_merged", "hf")["results"][0]["metrics"]
    for key in ("nll_no_think", "nll_think_mean", "info_gain", "acc_think"):
        assert a[key] == pytest.approx(b[key], abs=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("backend, zero", [("ddp", 2), ("deepspeed", 2)])
def test_two_ranks_train_the_adapter_as_one_process(backend, zero, tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from tests.integration.test_distributed import ROOT

    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, WORKER, "step", "--model", str(tiny_model_dir), "--lora", "--out", str(one)],
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, check=True, capture_output=True)
    torchrun(WORKER, "step", "--model", str(tiny_model_dir), "--lora", "--backend", backend, "--zero", str(zero),
             "--out", str(two))
    one, two = torch.load(one), torch.load(two)
    assert two["stats"]["optim/grad_norm"] == pytest.approx(one["stats"]["optim/grad_norm"], rel=1e-5)
    assert set(two["state"]) == set(one["state"]) and all("lora_" in k for k in one["state"])
    for name, ref in one["state"].items():
        torch.testing.assert_close(two["state"][name], ref, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_two_rank_zero2_lora_save_and_resume_continue_identically(tiny_model_dir, corpus_file, tmp_path):
    """DeepSpeed's checkpoint of a LoRA run leaves the frozen base out; a resume continues exactly."""
    from tests.integration.test_distributed import rows as dist_rows, train_args

    options = ["dist.backend=deepspeed", "dist.zero_stage=2", "rollout.sampler=hf", "train.steps=4",
               "train.save_every=2", "optim.lr=1e-2", *LORA]
    torchrun(*train_args(tiny_model_dir, corpus_file, tmp_path / "full", *options))
    half = tmp_path / "full" / "checkpoints" / "step_000002"
    module_states = list((half / "deepspeed").rglob("*model_states.pt"))
    assert module_states and all(f.stat().st_size < 200_000 for f in module_states)  # no base weights in them
    torchrun(*train_args(tiny_model_dir, corpus_file, tmp_path / "resumed", *options, f"resume={half}"))
    full, resumed = dist_rows(tmp_path / "full"), dist_rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in ("reward/mean", "score/no_think", "optim/grad_norm", "optim/lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    from safetensors.torch import load_file

    ends = [load_file(tmp_path / run / "checkpoints" / "step_000004" / "adapter_model.safetensors")
            for run in ("full", "resumed")]
    for k in ends[0]:
        torch.testing.assert_close(ends[1][k], ends[0][k], rtol=0, atol=1e-7, msg=k)


def test_lora_config_refusals():
    from rntp.config import ConfigError

    for bad, says in [(["dist.backend=fsdp2"], "not fsdp2"),
                      (["dist.backend=deepspeed", "dist.zero_stage=3"], "zero_stage 3"),
                      (["rollout.vllm.sleep_level=2"], "sleep_level=2")]:
        with pytest.raises(ConfigError, match=says):
            load_config(None, ["model.lora.enabled=true", *bad])
    load_config(None, ["model.lora.enabled=false", "dist.backend=fsdp2"])  # only with LoRA on


def test_targets_vllm_cannot_serve_are_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="embeddings or output head"):
        lora.wrap(model, LoRAConfig(enabled=True, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="matches no layer|not found|Target modules"):
        lora.wrap(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                  LoRAConfig(enabled=True, target_modules=["no_such_proj"]))


# -- vLLM serves the adapter ----------------------------------------------------------------------------

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")


@pytest.fixture(scope="module")
def lora_engine(tiny_model_dir, tokenizer):
    """One in-process vLLM engine (fp32) with LoRA on, for this module's vLLM tests."""
    from rollout import ThinkTags, make_sampler

    sampler = make_sampler("vllm", str(tiny_model_dir), ThinkTags(tokenizer), dtype="float32", max_model_len=256,
                           lora_rank=4)
    yield sampler
    sampler.close()


def lora_trainer(tiny_model_dir):
    """A plain engine on the tiny model under a fresh adapter, as a LoRA run makes it."""
    from rntp.distributed import DistInfo
    from rntp.engines import make_engine
    from rntp.models import load_trainable

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", *LORA, "optim.lr=2e-2"])
    torch.manual_seed(0)
    policy = load_trainable(str(tiny_model_dir), cfg, DistInfo(0, 1), 1)
    return make_engine(policy, cfg, DistInfo(0, 1), 1, total_steps=10)


def trainer_logprobs(engine, seqs):
    from rntp.forward.scoring import token_logprobs

    engine.train(False)
    with torch.no_grad():
        out = [token_logprobs(engine.model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
               for s in seqs]
    engine.train(True)
    return out


def one_step(engine, seq):
    from rntp.forward.scoring import token_logprobs

    ids = torch.tensor([seq])
    engine.backward(-token_logprobs(engine.model, ids, torch.ones_like(ids)).sum())
    engine.step()


@needs_vllm
def test_vllm_serves_the_pushed_adapter_like_the_trainer(lora_engine, tiny_model_dir, tokenizer):
    """After a LoRA step and a push (the adapter alone, reloaded in place), vLLM's log-probs are the
    trainer's (fp32, 2e-5); again after a second step; and the samples' behaviour log-probs are the
    trainer's sampling log-probs of the same tokens."""
    import time

    from rntp.forward.scoring import score_groups
    from rollout import SamplingSpec

    engine = lora_trainer(tiny_model_dir)
    seqs = [tokenizer.encode(t, add_special_tokens=False) for t in
            ("Each module returns a list of names.", "The default argument is the first value.")]

    def gap():
        served = lora_engine.prompt_logprobs(seqs)
        return max((torch.tensor(row[1:]) - ours).abs().max().item()
                   for row, ours in zip(served, trainer_logprobs(engine, seqs)))

    stream = engine.weights()
    assert stream.adapter is not None and all("lora_" in name for name, _, _ in stream.metadata)
    lora_engine.push_weights(stream)  # the fresh adapter (lora_B = 0): the base
    assert gap() < 2e-5
    for _ in range(2):
        one_step(engine, seqs[0])
        assert gap() > 1e-3  # the engine still serves the previous adapter
        start = time.perf_counter()
        lora_engine.push_weights(engine.weights())
        print(f"adapter push {time.perf_counter() - start:.3f} s")
        assert gap() < 2e-5
    prompts = [lora_engine.tags.prompt(s[:5]) for s in seqs]
    rollouts = lora_engine.sample(prompts, SamplingSpec(n=3, max_tokens=6, temperature=0.7, seed=3))
    engine.train(False)
    scored = score_groups(engine.model, [s[:5] for s in seqs], rollouts, [s[5:9] for s in seqs], pad_id=0,
                          micro_batch=8, temperature=0.7)
    engine.train(True)
    mask = scored.batch.thought_mask
    assert (scored.thought_logprobs[mask] - scored.behaviour_logprobs[mask]).abs().max() < 1e-4


@needs_vllm
def test_a_lora_run_with_vllm_keeps_sampler_and_trainer_in_step(tiny_config, tmp_path):
    train(tiny_config(*LORA, "rollout.sampler=vllm", "rollout.vllm.kv_cache_gb=1", "train.steps=3",
                      "optim.lr=2e-2", "rollout.check_sync_every=1", "reward.baseline=ema"))
    history = rows(tmp_path / "run")
    assert all(r["sync/max_logprob_diff"] < 1e-4 for r in history)  # after every push
    assert all(r["mismatch/max_abs_log_ratio"] < 1e-4 for r in history)  # behaviour = trainer's old log-probs


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("engines", ["rollout.vllm.tensor_parallel_size=1", "rollout.vllm.tensor_parallel_size=2"])
def test_two_ranks_with_lora_keep_their_vllm_engines_in_step(engines, tiny_model_dir, corpus_file, tmp_path):
    """Under torchrun: an engine per rank, or one shared by both at TP=2 (pooled requests); each rank pushes
    the adapter to its engine (its own folder) and the engines score like the trainer after every push."""
    from tests.integration.test_distributed import rows as dist_rows, train_args

    torchrun(*train_args(tiny_model_dir, corpus_file, tmp_path / "run", "rollout.sampler=vllm", "dist.backend=ddp",
                         engines, "train.steps=2", "rollout.check_sync_every=1", "optim.lr=2e-2",
                         "rollout.vllm.kv_cache_gb=1", *LORA))
    history = dist_rows(tmp_path / "run")
    assert [r["step"] for r in history] == [1, 2]
    assert all(r["sync/max_logprob_diff"] < 1e-4 for r in history)
    assert history[-1]["optim/grad_norm"] > 0


@needs_vllm
def test_vllm_loads_the_merged_export_and_scores_it_as_the_adapter(lora_engine, tiny_model_dir, tokenizer, tmp_path):
    from rollout import ThinkTags, make_sampler
    from rollout.adapter import save_adapter

    engine = lora_trainer(tiny_model_dir)
    seq = tokenizer.encode("Each module returns a list of names.", add_special_tokens=False)
    one_step(engine, seq)
    folder = tmp_path / "ckpt"
    save_adapter(folder, dict(engine.full_tensors()), engine.adapter)
    lora_engine.push_weights(engine.weights())
    export(folder, tmp_path / "merged")
    plain = make_sampler("vllm", str(tmp_path / "merged"), ThinkTags(tokenizer), dtype="float32", max_model_len=256)
    try:
        a, b = lora_engine.prompt_logprobs([seq])[0], plain.prompt_logprobs([seq])[0]
    finally:
        plain.close()
    assert max(abs(x - y) for x, y in zip(a[1:], b[1:])) < 2e-5


@pytest.fixture(scope="module")
def lora_server(tiny_model_dir, tmp_path_factory):
    """`rntp serve` for a LoRA run (vLLM's LoRA support and runtime adapter loading on)."""
    from tests.integration.test_server import SERVE, start_server, stop_server

    proc, url = start_server(tiny_model_dir, tmp_path_factory.mktemp("lora-server") / "server.log", *SERVE, *LORA)
    yield url
    stop_server(proc)


@needs_vllm
@pytest.mark.slow
def test_a_server_serves_the_pushed_adapter_like_the_trainer(lora_server, tiny_model_dir, tokenizer):
    from tests.integration.test_server import server_sampler

    engine = lora_trainer(tiny_model_dir)
    sampler = server_sampler(lora_server, tokenizer)
    seqs = [tokenizer.encode("Each module returns a list of names.", add_special_tokens=False)]

    def gap():
        served = sampler.prompt_logprobs(seqs)
        return max((torch.tensor(row[1:]) - ours).abs().max().item()
                   for row, ours in zip(served, trainer_logprobs(engine, seqs)))

    try:
        for _ in range(2):  # the first load, then an unload and a load of the new adapter
            one_step(engine, seqs[0])
            sampler.push_weights(engine.weights())
            assert sampler.model == "rntp-policy" and gap() < 2e-5
    finally:
        sampler.close()


def test_serve_starts_vllm_with_lora_for_a_lora_run():
    from rollout.adapter import vllm_max_lora_rank
    from rollout.server import serve_command

    cfg = load_config(None, [*LORA, "model.lora.rank=12"])
    argv, env = serve_command("/m", cfg, host="127.0.0.1", port=1, max_model_len=64, vllm_args=[], secret="s")
    at = argv.index("--max-lora-rank")
    assert "--enable-lora" in argv and argv[at + 1] == "16" and argv[argv.index("--max-loras") + 1] == "1"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    argv, env = serve_command("/m", load_config(None, []), host="127.0.0.1", port=1, max_model_len=64, vllm_args=[],
                              secret="s")
    assert "--enable-lora" not in argv and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
