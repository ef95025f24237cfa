"""Tags as tokens: a model whose tokenizer splits `<think>`/`</think>` into pieces gets them as two
added special tokens, so that ending a thought is one choice the policy can learn.

Why: a small base model never writes the three pieces `</`, `think`, `>` in a row (SmolLM2-135M:
0 of 128 thoughts closed within 24 tokens), so every thought ran to its budget and the policy had
nothing to learn about when to stop. As one token, the close tag is a single draw. Its starting
embedding is a copy of the full stop's, so at first a thought ends about as often as a sentence
does (SmolLM2-135M: 40% of thoughts close within 24 tokens) and, read by the continuation, it
stands where a sentence ends. The open tag starts as the mean of its pieces' embeddings, which
keeps most of what the pieces meant and is almost never sampled. The one cost: the new close token
takes a share of the probability at every position, so the no-think NLL of the starting model is
0.7% above the original's on the demo's held-out text (the base model of every comparison is the
model with the tokens added; both figures are in docs/results.md).

Models that already have the tags as tokens (Qwen3, DeepSeek-R1's `<think>`) are used unchanged,
and `rollout.tag_tokens=text` keeps the tags as plain text. The prepared copy lives under
`RNTP_HOME/tagged/`, keyed by the model and tags, and is made once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

INIT_VERSION = "1"  # bump when the initialisation below changes, so that old copies are not reused


def single_token(tokenizer, text: str) -> bool:
    return len(tokenizer.encode(text, add_special_tokens=False)) == 1


def needs_tag_tokens(tokenizer, open_tag: str, close_tag: str) -> bool:
    return not (single_token(tokenizer, open_tag) and single_token(tokenizer, close_tag))


def _fingerprint(path: str) -> str:
    """What identifies the source model: for a folder its config and weight files (name, size,
    mtime); for a hub name the name itself."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    return json.dumps([str(folder.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])


def tagged_dir(path: str, open_tag: str, close_tag: str) -> Path:
    from rntp.prepare import rntp_home

    key = hashlib.sha256("\0".join([INIT_VERSION, _fingerprint(path), open_tag, close_tag]).encode()).hexdigest()
    return rntp_home() / "tagged" / f"{Path(path).name}-{key[:12]}"


def add_tags_to_tokenizer(tokenizer, open_tag: str, close_tag: str) -> list[str]:
    """Add the tags that are not single tokens as special tokens; the tags added."""
    new = [tag for tag in (open_tag, close_tag) if not single_token(tokenizer, tag)]
    tokenizer.add_tokens(new, special_tokens=True)
    return new


def add_tag_tokens(model, tokenizer, open_tag: str, close_tag: str) -> None:
    """Add the tags as special tokens to `tokenizer` and rows for them to `model`'s embeddings (and its
    output head when untied): open = mean of its pieces' rows, close = the row of the full stop."""
    import torch

    pieces = {tag: tokenizer.encode(tag, add_special_tokens=False) for tag in (open_tag, close_tag)}
    full_stop = tokenizer.encode(".", add_special_tokens=False)[-1]
    new = add_tags_to_tokenizer(tokenizer, open_tag, close_tag)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # else spare rows (Qwen's padding) take them
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tables = [model.get_input_embeddings().weight]
    if model.get_output_embeddings() is not None and \
            model.get_output_embeddings().weight.data_ptr() != tables[0].data_ptr():
        tables.append(model.get_output_embeddings().weight)
    with torch.no_grad():
        for tag in new:
            row = tokenizer.convert_tokens_to_ids(tag)
            for table in tables:
                start = table[full_stop] if tag == close_tag else table[pieces[tag]].float().mean(0)
                table[row] = start.to(table.dtype)


def model_with_tags(path: str, open_tag: str, close_tag: str, *, trust_remote_code: bool = False) -> str:
    """The model folder to train from: `path` when its tokenizer already has both tags as single
    tokens, else a copy with them added (made here once, then reused)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    if not needs_tag_tokens(tokenizer, open_tag, close_tag):
        return path
    out = tagged_dir(path, open_tag, close_tag)
    if (out / "config.json").exists():
        return str(out)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code)
    add_tag_tokens(model, tokenizer, open_tag, close_tag)
    staging = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(out)  # atomic: a rank or node that raced us to it leaves the first copy in place
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("added %s and %s as tokens to %s -> %s", open_tag, close_tag, path, out)
    return str(out)


def run_tokenizer(cfg):
    """The tokenizer of the model a run starts from (`base_model_path`), without loading any weights or
    making the tagged copy, so that data and lengths are checked before a model loads: the model's own
    tokenizer with the tags added as `add_tag_tokens` adds them where `rollout.tag_tokens=add` needs it."""
    from rntp.prepare import resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path))
    if cfg.rollout.tag_tokens == "add":
        add_tags_to_tokenizer(tokenizer, cfg.rollout.open_tag, cfg.rollout.close_tag)
    return tokenizer


def base_model_path(cfg) -> str:
    """The model a run starts from: `model.name_or_path` resolved (`rntp.prepare.resolve_model_path`),
    with the tags added as tokens where `rollout.tag_tokens=add` needs them."""
    from rntp.prepare import resolve_model_path

    path = resolve_model_path(cfg.model.name_or_path)
    if cfg.rollout.tag_tokens == "text":
        return path
    return model_with_tags(path, cfg.rollout.open_tag, cfg.rollout.close_tag,
                           trust_remote_code=cfg.model.trust_remote_code)


def load_tokenizer(path: str):
    """The tokenizer of a model folder; a damaged tokenizer file is one error naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a damaged tokenizer file: name the folder, not a parser traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {first}") from None
