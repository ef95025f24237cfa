"""Checkpoints: the model in Hugging Face format (safetensors), trainer state beside it.

Layout: <run_dir>/checkpoints/step_000020/{model.safetensors, config.json, tokenizer files,
trainer_state.pt, rntp_config.yaml, manifest.json}; <run_dir>/checkpoints/latest names the
newest. A checkpoint is written to a temporary folder, flushed to disk (files and folders
fsynced) and renamed into place, so a crash mid-write never leaves a half checkpoint under a
real name. manifest.json holds every file's size and checksum: a checkpoint damaged later
(a truncated file, flipped bytes) is detected before it is trusted, and a run folder falls
back to its newest intact checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: Path, step: int, engine, tokenizer, rank_state: dict, common: dict, config_yaml: str,
                    keep: int = 0) -> Path:
    """Every rank calls this. Rank 0 stages the folder; the engine writes the consolidated HF
    model (rank 0) and any sharded optimizer state (all ranks); each rank's data cursor and RNG
    go into trainer_state.pt; rank 0 renames the folder into place and updates `latest`."""
    from rntp.distributed import all_gather_object, barrier, broadcast_object

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    staging = root / f".step_{step:06d}.tmp"
    if engine.info.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    engine.export(staging, tokenizer)
    backend_state = engine.save(staging)
    fsync_tree(staging)  # every rank flushes what it wrote (sharded optimizer state)
    ranks = all_gather_object(rank_state)
    if engine.info.is_main:
        torch.save({**common, **backend_state, "step": step, "ranks": ranks}, staging / STATE_FILE)
        (staging / "rntp_config.yaml").write_text(config_yaml)
        write_manifest(staging)
        fsync_tree(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        fsync_dir(root)  # the rename is durable before `latest` names it
        write_pointer(root, final.name)
        if keep > 0:  # drop the oldest beyond `keep`
            for old in sorted(root.glob("step_*"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return broadcast_object(final)


def find_checkpoint(path: str | Path, checksums: bool = True) -> Path:
    """An intact checkpoint: the folder itself, or a run folder's newest intact checkpoint. Damaged
    ones in a run folder are skipped with a warning that names them; a damaged checkpoint named
    directly is an error (say the run folder to fall back)."""
    path = Path(path).expanduser()
    if (path / STATE_FILE).exists() or (path / MANIFEST).exists():
        problem = checkpoint_problem(path, checksums)
        if problem:
            raise ValueError(f"checkpoint {path} is damaged: {problem}; resume from its run folder "
                             f"({path.parent.parent}) to fall back to an older checkpoint")
        return path
    root = path / "checkpoints"
    candidates = sorted(root.glob("step_*"), reverse=True) if root.is_dir() else []
    skipped = []
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt, checksums)
        if problem is None:
            if skipped:
                log.warning("skipped damaged checkpoint(s) %s; using %s", "; ".join(skipped), ckpt)
            return ckpt
        skipped.append(f"{ckpt.name} ({problem})")
    if skipped:
        raise FileNotFoundError(f"no intact checkpoint in {root}: {'; '.join(skipped)}")
    raise FileNotFoundError(f"no checkpoint at {path} (expected {STATE_FILE} or checkpoints/step_*)")


def load_trainer_state(ckpt: Path) -> dict:
    # Our own file (optimizer tensors, RNG states, python objects): not a foreign download.
    try:
        return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # a damaged file is named, not a pickle traceback
        raise ValueError(f"cannot read {Path(ckpt) / STATE_FILE}: {type(e).__name__}: {e}") from None


# ---- integrity: manifest, verification, durable writes ------------------------------------------

def _checksum(path: Path) -> str:
    import xxhash  # a dependency of datasets; fast enough to hash a checkpoint at disk speed

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Every file's size and checksum, written last into the checkpoint folder."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "xxh3_128": _checksum(p)} for p in files}
    (Path(folder) / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")


def checkpoint_problem(folder: Path, checksums: bool = True) -> str | None:
    """What is wrong with a checkpoint folder, or None. With a manifest: every file present with
    its size (and checksum). Older checkpoints without one get structural checks only."""
    from rntp.prepare import safetensors_problem

    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    manifest = folder / MANIFEST
    if not manifest.exists():
        state = folder / STATE_FILE
        if not state.exists() or state.stat().st_size == 0:
            return f"{STATE_FILE} missing or empty"
        for weights in folder.glob("*.safetensors"):
            if problem := safetensors_problem(weights):
                return problem
        return None
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    for name, entry in entries.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, {entry['size']} written"
    if checksums:
        for name, entry in entries.items():
            if _checksum(folder / name) != entry["xxh3_128"]:
                return f"{name} does not match its checksum (flipped bytes)"
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file, then every folder (deepest first), so a rename publishes data on disk."""
    folder = Path(folder)
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_dir(d)
    fsync_dir(folder)


def write_pointer(root: Path, name: str) -> None:
    """`latest` changes atomically and durably: temporary file, fsync, rename, fsync the folder."""
    pointer = root / ".latest.tmp"
    with open(pointer, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, root / "latest")
    fsync_dir(root)
