"""Metrics: JSONL always, Weights & Biases (offline unless configured), step timers, plots."""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch

from rntp.runfiles import cut_jsonl, wandb_run_id

log = logging.getLogger(__name__)


class PhaseTimer:
    """Wall time per phase of a step: `with timer("sample"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def peak_memory_gb() -> float:
    """Peak resident memory of this process (CPU) or peak allocated GPU memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


Reduction = Literal["mean", "sum", "max"]


class MetricsRow:
    """One step's metrics on one rank, each with how it combines across ranks, declared where the
    metric is added: `row.add({...})` means over ranks, `row.add({...}, "sum")` adds them up (counts,
    throughputs), `row.add({...}, "max")` keeps the largest (times, memory, worst-case gaps)."""

    def __init__(self):
        self.values: dict[str, object] = {}
        self.reductions: dict[str, Reduction] = {}

    def add(self, metrics: dict, reduce: Reduction = "mean") -> "MetricsRow":
        for key, value in metrics.items():
            self.values[key] = value
            self.reductions[key] = reduce
        return self

    def __getitem__(self, key: str):
        return self.values[key]


def reduce_rows(rows: list[MetricsRow]) -> dict:
    """One metrics row from every rank's row (rank 0's keys), each key by its declared reduction.
    A key no rank gave a number for keeps rank 0's value."""
    out = {}
    first = rows[0]
    for key in first.values:
        values = [r.values[key] for r in rows if r.values.get(key) is not None]
        if not values or not all(isinstance(v, (int, float)) for v in values):
            out[key] = first.values[key]
        elif first.reductions[key] == "sum":
            out[key] = sum(values)
        elif first.reductions[key] == "max":
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    return out


def _clean(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    def __init__(self, run_dir: Path, config: dict, *, wandb_mode: str = "offline", project: str = "rntp",
                 group: str | None = None, resume_step: int = 0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        self.rows = cut_jsonl(self.path, resume_step)  # a resumed run keeps the history up to its checkpoint
        self.wandb = None
        if wandb_mode != "disabled":
            import wandb

            # The id kept in the run folder: a resumed run continues the same W&B run.
            self.wandb = wandb.init(project=project, group=group, dir=str(self.run_dir), mode=wandb_mode,
                                    config=config, name=self.run_dir.name, reinit="finish_previous",
                                    id=wandb_run_id(self.run_dir), resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=step)

    def plot(self, keys: tuple[str, ...] = ("reward/mean", "info_gain", "thought/len_mean")) -> Path | None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if any(r.get(k) is not None for k in keys)]
        if not rows:
            return None
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5))
        for ax, key in zip(axes, keys):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".")
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.run_dir / "training.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
