"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random model built on it, a generated corpus."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the a model text reads writes function returns value list string file data object class "
         "method number error line token name path module type default argument call result first "
         "next each when if then else while for from with into over under before after").split()


def make_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from rntp.prepare import prepare_model

    return prepare_model()  # a no-op when `make test` has already prepared it


@pytest.fixture(scope="session")
def tokenizer(request, tmp_path_factory):
    """SmolLM2's tokenizer; with RNTP_TOKENIZER=generated (`make gpu-check` on a machine that cannot
    fetch the default model) a byte-level BPE trained on generated text instead."""
    from transformers import AutoTokenizer

    if os.environ.get("RNTP_TOKENIZER") == "generated":
        from rntp.tools.gpu_check import generated_corpus, trained_tokenizer

        out = tmp_path_factory.mktemp("tokenizer")
        return trained_tokenizer(generated_corpus(out / "corpus.jsonl", docs=50), out)
    return AutoTokenizer.from_pretrained(request.getfixturevalue("default_model_dir"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer, saved in float32 (head size 64, which
    vLLM's CPU attention supports)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).to(torch.float32)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """40 generated documents of a few sentences each, as JSONL."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for d in range(40):
            f.write(json.dumps({"text": " ".join(make_sentences(12, seed=d))}) + "\n")
    return path


@pytest.fixture
def tiny_config(tiny_model_dir, corpus_file, tmp_path):
    """A fast config on the tiny model and generated corpus; tests override what they need."""
    from rntp.config import load_config

    def build(*overrides: str):
        return load_config(None, [
            f"run_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_model_dir}", f"data.source={corpus_file}",
            "data.chunk_tokens=64", "data.min_context=16", "data.horizon=4", "rollout.sampler=hf",
            # tags as text: the tiny model is used as saved (tests/integration/test_think_tokens.py covers `add`)
            "rollout.tag_tokens=text", "rollout.group_size=4", "rollout.max_thought_tokens=6",
            "train.positions_per_step=2",
            "train.micro_batch=8", "train.steps=2", "log.wandb_mode=disabled", "log.progress=false",
            "log.plot=false", *overrides])

    return build
