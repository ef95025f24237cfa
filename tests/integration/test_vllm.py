"""vLLM on CPU: well-formed spans from both samplers, weight push, and the demo path for real."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from rntp.forward.scoring import token_logprobs
from rollout import SamplingSpec, ThinkTags, make_sampler
from rollout.base import WeightStream
from rollout.vllm_utils import vllm_available

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")]


@pytest.fixture(scope="module")
def vllm_sampler(tiny_model_dir, tokenizer):
    sampler = make_sampler("vllm", str(tiny_model_dir), ThinkTags(tokenizer), dtype="float32", max_model_len=256)
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def hf_sampler(tiny_model_dir, tokenizer):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return make_sampler("hf", str(tiny_model_dir), ThinkTags(tokenizer), policy=policy)


@pytest.mark.parametrize("which", ["vllm_sampler", "hf_sampler"])
def test_samplers_return_well_formed_spans(which, request, tokenizer):
    sampler = request.getfixturevalue(which)
    tags = sampler.tags
    prompts = [tags.prompt(tokenizer.encode("The value returned by the function is", add_special_tokens=False)),
               tags.prompt(tokenizer.encode("Each line of the file", add_special_tokens=False))]
    spec = SamplingSpec(n=3, max_tokens=6, seed=11)
    rollouts = sampler.sample(prompts, spec)
    assert [r.group for r in rollouts] == [0, 0, 0, 1, 1, 1]
    for r in rollouts:
        assert r.prompt_ids == prompts[r.group]
        assert 0 <= r.n_sampled <= 6
        if r.closed:
            assert tags.close_tag in tokenizer.decode(r.thought_ids) and r.n_sampled == len(r.thought_ids)
        else:
            assert r.thought_ids[r.n_sampled:] == tags.close_ids and r.n_sampled == 6
    assert len({tuple(r.thought_ids) for r in rollouts}) > 1  # G samples differ
    again = sampler.sample(prompts, spec)
    assert [r.thought_ids for r in again] == [r.thought_ids for r in rollouts]  # same seed, same thoughts


def test_weight_push_makes_vllm_match_the_trainer(vllm_sampler, tiny_model_dir, tokenizer):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    seqs = [tokenizer.encode(t, add_special_tokens=False) for t in
            ("Each module returns a list of names.", "The default argument is the first value.")]
    before = vllm_sampler.prompt_logprobs(seqs)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    ids = torch.tensor([seqs[0]])
    (-token_logprobs(policy, ids, torch.ones_like(ids)).sum()).backward()  # one real training step
    optimizer.step()
    vllm_sampler.push_weights(WeightStream.of_module(policy))
    after = vllm_sampler.prompt_logprobs(seqs)
    policy.eval()
    for seq, b, a in zip(seqs, before, after):
        ids = torch.tensor([seq])
        with torch.no_grad():
            trainer = token_logprobs(policy, ids, torch.ones_like(ids))[0].tolist()
        assert max(abs(x - y) for x, y in zip(a[1:], trainer)) < 1e-4
        assert max(abs(x - y) for x, y in zip(b[1:], trainer)) > 1e-2  # the push changed vLLM's weights


def test_sleep_where_vllm_has_no_sleep_mode_is_a_clear_error(tiny_model_dir, tokenizer):
    if torch.cuda.is_available():
        pytest.skip("CUDA has a sleep mode")
    from rntp.config import load_config

    cfg = load_config(None, ["rollout.vllm.sleep_level=1"])
    with pytest.raises(ValueError, match="no sleep mode"):
        make_sampler("vllm", str(tiny_model_dir), ThinkTags(tokenizer), vllm_cfg=cfg.rollout.vllm)


def trained_copy(model_dir, tokenizer):
    """The tiny model after one real optimizer step (so every weight differs from the engine's)."""
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("Each module returns a list of names.", add_special_tokens=False)])
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    (-token_logprobs(policy, ids, torch.ones_like(ids)).sum()).backward()
    optimizer.step()
    return policy.eval()


def test_a_push_in_buckets_that_cut_fused_layers_loads_every_weight(vllm_sampler, tiny_model_dir, tokenizer):
    """One parameter per bucket: buckets end between q_proj and k_proj and between gate_proj and
    up_proj, which vLLM fuses (qkv_proj, gate_up_proj)."""
    policy = trained_copy(tiny_model_dir, tokenizer)
    named = list(policy.named_parameters(remove_duplicate=False))
    assert any(n.endswith("q_proj.weight") for n, _ in named) and any(n.endswith("gate_proj.weight") for n, _ in named)
    stream = WeightStream(lambda: iter([[(n, p.detach())] for n, p in named]),
                          [(n, p.dtype, tuple(p.shape)) for n, p in named], bucket_mb=0.001)
    vllm_sampler.push_weights(stream)
    seq = tokenizer.encode("The default argument is the first value.", add_special_tokens=False)
    served = torch.tensor(vllm_sampler.prompt_logprobs([seq])[0][1:])
    ids = torch.tensor([seq])
    with torch.no_grad():
        trainer = token_logprobs(policy, ids, torch.ones_like(ids))[0]
    assert (served - trainer).abs().max().item() < 1e-4


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (0.7, 0.8), (1.3, 0.9)])
def test_trainer_thought_logprobs_are_those_vllm_sampled_from(temperature, top_p, vllm_sampler, tiny_model_dir,
                                                              tokenizer):
    """The old log-probs of the ratio must be the sampling distribution's: vLLM's processed log-probs
    (after temperature and top-p) of the tokens it drew equal the trainer's scoring of them."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from rntp.forward.scoring import score_groups
    from rollout.vllm_utils import thought_request
    from rollout.spans import pad_id_of

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    vllm_sampler.push_weights(WeightStream.of_module(policy))  # earlier tests pushed other weights
    tags = vllm_sampler.tags
    contexts = [tokenizer.encode(t, add_special_tokens=False) for t in
                ("The value returned by the function is", "Each line of the file")]
    spec = SamplingSpec(n=3, max_tokens=6, temperature=temperature, top_p=top_p, seed=5)
    params = [SamplingParams(**thought_request(spec, i, tags.close_tag)) for i in range(2)]  # logprobs=0 in it
    outputs = vllm_sampler.llm.generate([TokensPrompt(prompt_token_ids=tags.prompt(c)) for c in contexts], params,
                                        use_tqdm=False)
    rollouts, sampled = [], []
    for group, out in enumerate(outputs):
        for c in sorted(out.outputs, key=lambda c: c.index):
            rollouts.append(tags.finish(group, tags.prompt(contexts[group]), list(c.token_ids)))
            sampled.append([entry[tok].logprob for tok, entry in zip(c.token_ids, c.logprobs)])
    targets = [[284, 262, 1171, 13]] * 2
    scored = score_groups(policy, contexts, rollouts, targets, pad_id=pad_id_of(tokenizer), micro_batch=8,
                          temperature=temperature, top_p=top_p)
    plain = score_groups(policy, contexts, rollouts, targets, pad_id=pad_id_of(tokenizer), micro_batch=8)
    worst = differs = 0.0
    for i, r in enumerate(rollouts):
        ours = scored.thought_logprobs[i][scored.batch.thought_mask[i]]
        theirs = torch.tensor(sampled[i][: r.n_sampled])
        worst = max(worst, (ours - theirs).abs().max().item())
        differs = max(differs, (plain.thought_logprobs[i][plain.batch.thought_mask[i]] - theirs).abs().max().item())
    assert worst < 1e-4
    assert differs > 1e-2  # log-probs at temperature 1 are not what was sampled from


@pytest.mark.parametrize("which", ["vllm_sampler", "hf_sampler"])
def test_samplers_report_the_logprobs_they_sampled_from(which, request, tiny_model_dir, tokenizer):
    """Behaviour log-probs come with each sample (not a second pass) and, with the trainer's weights
    in fp32, equal the trainer's log-probs under the same temperature and top-p (within 1e-4)."""
    from rntp.forward.scoring import score_groups
    from rollout.spans import pad_id_of

    sampler = request.getfixturevalue(which)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    sampler.push_weights(WeightStream.of_module(policy))  # earlier tests pushed other weights
    if which == "hf_sampler":
        policy = sampler.model
    tags = sampler.tags
    contexts = [tokenizer.encode(t, add_special_tokens=False) for t in
                ("The value returned by the function is", "Each line of the file")]
    spec = SamplingSpec(n=3, max_tokens=6, temperature=0.8, top_p=0.9, seed=9)
    rollouts = sampler.sample([tags.prompt(c) for c in contexts], spec)
    assert all(len(r.behaviour_logprobs) == r.n_sampled for r in rollouts)
    scored = score_groups(policy, contexts, rollouts, [[284, 262, 1171]] * 2, pad_id=pad_id_of(tokenizer),
                          micro_batch=8,
                          temperature=0.8, top_p=0.9)
    mask = scored.batch.thought_mask
    gap = (scored.thought_logprobs[mask] - scored.behaviour_logprobs[mask]).abs().max().item()
    assert gap < 1e-4


def test_seeded_sampling_of_more_prompt_tokens_than_one_engine_step_takes(vllm_sampler, tokenizer):
    """Seeded requests whose prefills exceed one engine step (more than max_num_batched_tokens prompt
    tokens in one call: 8 prompts of ~70 tokens x 16 thoughts) are split over steps by chunked prefill,
    and vLLM 0.32 then rewinds each split request's generator (`gen.set_offset`), which CPU generators
    do not have: the engine died with "CPU Generator does not use offset". The CPU engine runs without
    chunked prefill; the draws stay those of the seeds (the same twice)."""
    words = "the value returned by the function is checked against each line of the file".split()
    contexts = [tokenizer.encode(" ".join(words * 5)[: 300 + 7 * i], add_special_tokens=False) for i in range(8)]
    assert sum(len(c) for c in contexts) * 16 > 4096
    spec = SamplingSpec(n=16, max_tokens=4, seed=3)
    prompts = [vllm_sampler.tags.prompt(c) for c in contexts]
    first = vllm_sampler.sample(prompts, spec)
    assert len(first) == 8 * 16
    vllm_sampler.llm.reset_prefix_cache()
    assert [r.thought_ids for r in vllm_sampler.sample(prompts, spec)] == [r.thought_ids for r in first]


# Last in this file: it starts and closes a second engine in this process, and closing an engine
# tears down vLLM's process-wide parallel state that the module's engine also uses.
@pytest.mark.slow
def test_demo_config_trains_the_default_model_with_vllm(default_model_dir, tmp_path):
    """The `make demo` path, shortened: the real CLI, SmolLM2-135M, vLLM sampling, wandb offline."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "rntp", "train", "--config", "configs/demo.yaml", "train.steps=2",
           f"run_dir={tmp_path / 'demo'}", "log.wandb_mode=offline", "log.progress=false", "rollout.check_sync_every=1",
           "eval.num_positions=4"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoint:" in done.stdout and "plot:" in done.stdout
    # it ends with the before/after table on held-out text: the base model (step 0) and the last step
    assert "| | base model (step 0) | step 2 | change |" in done.stdout
    # the terminal has the person's lines; vLLM's banners, torch's warnings and W&B's messages are in train.log
    assert "held-out, step 0: information gain" in done.stdout and "held-out, step 2:" in done.stdout
    log = (tmp_path / "demo" / "train.log").read_text()
    for noise in ("Loading safetensors checkpoint shards", "wandb: ", "vllm"):
        assert noise in log and noise not in done.stdout + done.stderr, noise
    assert len((done.stdout + done.stderr).splitlines()) < 40, done.stdout + done.stderr
    rows = [json.loads(line) for line in open(tmp_path / "demo" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["step"] for r in rows if "eval/info_gain" in r] == [0, 2]
    rows = rows[1:]
    assert rows[-1]["time/sync"] > 0  # weights were pushed to the vLLM engine
    assert all(r["sync/max_logprob_diff"] < 1e-3 for r in rows)  # and it samples from the trained weights
    assert any((tmp_path / "demo" / "wandb").glob("offline-run-*"))
    ckpt = tmp_path / "demo" / "checkpoints" / "step_000002"
    assert (ckpt / "model.safetensors").exists()
    # The checkpoint loads in vLLM and transformers alike, and they agree on it.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    sampler = make_sampler("vllm", str(ckpt), ThinkTags(tokenizer), dtype="float32", max_model_len=256)
    seq = tokenizer.encode("Return the list of names in the module.", add_special_tokens=False)
    served = sampler.prompt_logprobs([seq])[0][1:]
    sampler.close()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ids = torch.tensor([seq])
    with torch.no_grad():
        local = token_logprobs(model, ids, torch.ones_like(ids))[0].tolist()
    assert max(abs(a - b) for a, b in zip(served, local)) < 1e-3
