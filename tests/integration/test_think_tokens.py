"""Tags as tokens (`rntp.think_tokens`): the tokens and embeddings they get, the copy a run trains
from, and thoughts that can close on the default model."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rntp.config import load_config
from rntp.data import PositionStream
from rntp.experiments.evaluate import run_eval
from rntp.prepare import default_corpus_dir
from rntp.think_tokens import add_tag_tokens, base_model_path, model_with_tags, run_tokenizer
from rntp.train import train
from rollout import SamplingSpec, ThinkTags, make_sampler

pytestmark = pytest.mark.integration


def test_tags_become_two_tokens_started_from_their_pieces_and_the_full_stop(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = model.get_input_embeddings().weight.detach().double().clone()
    vocab = before.shape[0]
    add_tag_tokens(model, tok, "<think>", "</think>")
    assert tok.encode("<think>", add_special_tokens=False) == [vocab]
    assert tok.encode("</think>", add_special_tokens=False) == [vocab + 1]
    table = model.get_input_embeddings().weight.detach().double()
    assert table.shape[0] == vocab + 2 and torch.equal(table[:vocab], before)  # the old rows are untouched
    pieces = tokenizer.encode("<think>", add_special_tokens=False)
    assert len(pieces) == 3
    mean = [sum(float(before[i, d]) for i in pieces) / len(pieces) for d in range(before.shape[1])]
    assert table[vocab].tolist() == pytest.approx(mean, abs=1e-6)
    full_stop = tokenizer.encode(".", add_special_tokens=False)[-1]
    assert torch.equal(table[vocab + 1], before[full_stop])
    # the head is tied: at every position the close tag is as likely as a full stop
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokenizer.encode("The value is returned when the list")])).logits
    assert torch.allclose(logits[0, :, vocab + 1], logits[0, :, full_stop])
    # a thought that writes the close token ends there; the ids stay as sampled
    tags = ThinkTags(tok)
    rollout = tags.finish(0, [5], [11, vocab + 1, 12])
    assert rollout.closed and rollout.thought_ids == [11, vocab + 1] and rollout.n_sampled == 2


def test_the_tagged_copy_is_made_once_and_models_with_the_tags_are_used_as_they_are(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("RNTP_HOME", str(tmp_path))
    first = model_with_tags(str(tiny_model_dir), "<think>", "</think>")
    assert Path(first).parent == tmp_path / "tagged"
    stamp = (Path(first) / "model.safetensors").stat().st_mtime_ns
    assert model_with_tags(str(tiny_model_dir), "<think>", "</think>") == first
    assert (Path(first) / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert model_with_tags(first, "<think>", "</think>") == first  # its tokenizer has both: as Qwen3's does
    assert model_with_tags(str(tiny_model_dir), "<reason>", "</reason>") != first  # other tags, another copy
    text = load_config(None, [f"model.name_or_path={tiny_model_dir}", "rollout.tag_tokens=text"])
    assert base_model_path(text) == str(tiny_model_dir)


def test_the_tokenizer_checked_before_any_model_loads_is_the_tagged_copy_s(tiny_model_dir, tmp_path, monkeypatch):
    """A run checks its data and lengths with `run_tokenizer` (no weights loaded, no copy made yet) and
    then trains the copy: both tokenizers must read every text alike."""
    monkeypatch.setenv("RNTP_HOME", str(tmp_path))
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "rollout.tag_tokens=add"])
    early = run_tokenizer(cfg)
    assert not (tmp_path / "tagged").exists()  # nothing made: only the tokenizer was read
    copy = AutoTokenizer.from_pretrained(base_model_path(cfg))
    text = "a <think>why?</think> b </think>\n\tcafé 東京 <think></think>."
    assert len(early) == len(copy) and early.encode(text) == copy.encode(text)
    assert early.convert_tokens_to_ids(["<think>", "</think>"]) == copy.convert_tokens_to_ids(["<think>", "</think>"])
    plain = load_config(None, [f"model.name_or_path={tiny_model_dir}", "rollout.tag_tokens=text"])
    assert len(run_tokenizer(plain)) == len(copy) - 2


def test_a_run_trains_and_evaluates_the_tagged_copy(tiny_config, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("RNTP_HOME", str(tmp_path / "home"))
    cfg = tiny_config("rollout.tag_tokens=add", "eval.every=2", "eval.num_positions=3", "eval.thoughts=2",
                      "train.steps=2")
    ckpt = train(cfg)
    trained = AutoTokenizer.from_pretrained(ckpt)
    assert len(trained) == len(tokenizer) + 2 and len(trained.encode("</think>", add_special_tokens=False)) == 1
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    # the base model is evaluated before the first step, on the positions every later evaluation uses
    assert [r["step"] for r in rows if "eval/info_gain" in r] == [0, 2]
    report = (tmp_path / "run" / "heldout.md").read_text()
    assert "base model (step 0)" in report and "step 2" in report
    # `rntp eval` of the run finds the same tagged base model (same tokenizer as the checkpoints)
    out = run_eval([str(tmp_path / "run")], cfg, tmp_path / "eval", sampler_kind="hf")
    assert [r["step"] for r in out["results"]] == [0, 2]


def test_thoughts_can_close_under_the_default_tags(default_model_dir, tmp_path, monkeypatch):
    """The default model with the default tags, sampled as a run samples (vLLM where installed): a
    share of the thoughts close before the budget. With the tags as text SmolLM2-135M closed none
    (0 of 128 at 24 tokens), so ending could never be learned."""
    heldout = default_corpus_dir() / "heldout.jsonl"  # read before RNTP_HOME moves
    monkeypatch.setenv("RNTP_HOME", str(tmp_path))  # the tagged copy goes to the test's folder
    cfg = load_config(None, [f"model.name_or_path={default_model_dir}", f"data.source={heldout}",
                             "data.chunk_tokens=128", "data.horizon=8"])
    path = base_model_path(cfg)
    tags = ThinkTags(AutoTokenizer.from_pretrained(path))
    assert len(tags.close_ids) == 1
    positions = PositionStream(cfg.data, tags.tokenizer).first_epoch(8)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sampler = make_sampler("auto", path, tags, policy=model, max_model_len=256)
    try:
        rollouts = sampler.sample([tags.prompt(p.context) for p in positions], SamplingSpec(n=4, max_tokens=24))
    finally:
        sampler.close()
    closed = [r for r in rollouts if r.closed]
    assert len(closed) >= 0.2 * len(rollouts), f"{len(closed)} of {len(rollouts)} thoughts closed"
    assert all(r.thought_ids[-1] == tags.close_ids[0] and r.n_sampled == len(r.thought_ids) for r in closed)
