"""The run folder's own files: what counts as an existing run, JSONL logs cut back on resume
(a kill can leave a torn last line), and the Weights & Biases run id kept for resumes."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# What a run leaves in its folder; any of them means the folder holds a run. (A sweep's
# train.log is written before the run starts, so it does not count.)
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "eval_positions.jsonl", "checkpoints", "training.png",
             "wandb", "wandb_run_id")
WANDB_ID_FILE = "wandb_run_id"


def resumes_inside(run_dir: Path, resume: str | None) -> bool:
    """Whether `resume` names a checkpoint of the run in `run_dir` itself (then the folder is continued)."""
    return bool(resume) and Path(resume).expanduser().resolve().is_relative_to(Path(run_dir).resolve())


def run_dir_problem(run_dir: Path, resuming_it: bool, overwrite: bool) -> str | None:
    """Why training may not start in `run_dir`, or None. A folder that already holds a run is
    refused unless the user resumes that run (`resuming_it`: the checkpoint lies inside it) or asks
    to overwrite it: nothing is lost or mixed by accident."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        return f"run_dir {run_dir} is a file, not a folder; choose another run_dir"
    if resuming_it or overwrite:
        return None
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found:
        return (f"run_dir {run_dir} already holds a run ({', '.join(found)}); continue it with resume={run_dir}, "
                f"start afresh there with overwrite=true, or choose another run_dir")
    return None


def clear_run(run_dir: Path) -> None:
    """overwrite=true: remove a previous run's files (only ours), so old and new never mix."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    log.warning("overwrite=true: removed the previous run's files in %s", run_dir)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL log. A torn last line (what a kill mid-write leaves) is dropped with a
    warning; a bad line anywhere else is an error that names the file and line."""
    lines = Path(path).read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) or not any(rest.strip() for rest in lines[number:]):
                log.warning("%s: ignoring a torn last line (%d characters)", path, len(line))
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def cut_jsonl(path: Path, last_step: int) -> list[dict]:
    """Keep the rows up to `last_step` (the resumed checkpoint): rows a crashed run logged after
    its last checkpoint are logged again by the resumed run and must not appear twice."""
    path = Path(path)
    if not path.exists():
        return []
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)
    return rows


def wandb_run_id(run_dir: Path) -> str:
    """The run folder's W&B run id, created on first use: a resumed run logs to the same W&B run."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)  # W&B ids are free-form; 12 hex characters never collide in practice
    path.write_text(run_id + "\n")
    return run_id
