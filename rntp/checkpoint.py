"""Checkpoints: the model in Hugging Face format (safetensors), trainer state beside it.

Layout: <run_dir>/checkpoints/step_000020/{model.safetensors, config.json, tokenizer files,
trainer_state.pt, rntp_config.yaml}; <run_dir>/checkpoints/latest names the newest. A
checkpoint is written to a temporary folder and renamed into place, so a crash mid-write
never leaves a half checkpoint under a real name.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


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
    ranks = all_gather_object(rank_state)
    if engine.info.is_main:
        torch.save({**common, **backend_state, "step": step, "ranks": ranks}, staging / STATE_FILE)
        (staging / "rntp_config.yaml").write_text(config_yaml)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        pointer = root / ".latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / "latest")
        if keep > 0:  # drop the oldest beyond `keep`
            for old in sorted(root.glob("step_*"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return broadcast_object(final)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    path = Path(path).expanduser()
    if (path / STATE_FILE).exists():
        return path
    pointer = path / "checkpoints" / "latest"
    if pointer.exists():
        found = path / "checkpoints" / pointer.read_text().strip()
        if (found / STATE_FILE).exists():
            return found
    raise FileNotFoundError(f"no checkpoint at {path} (expected {STATE_FILE} or checkpoints/latest)")


def load_trainer_state(ckpt: Path) -> dict:
    # Our own file (optimizer tensors, RNG states, python objects): not a foreign download.
    return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
