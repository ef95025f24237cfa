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

    def plot(self, smoothing: float = 0.9) -> Path | None:
        """training.png: information gain (per step, smoothed, and on held-out text wherever the run
        evaluated), thought length and closed thoughts, against step. The raw reward is left out:
        positions change every step, so it jumps by more than anything a run learns."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def series(key: str) -> list[tuple[int, float]]:
            return [(r["step"], r[key]) for r in self.rows if r.get(key) is not None]

        def smoothed(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
            out, avg = [], None
            for step, value in points:  # an exponential moving average, started at the first value
                avg = value if avg is None else smoothing * avg + (1 - smoothing) * value
                out.append((step, avg))
            return out

        def closed(key: str) -> list[tuple[int, float]]:
            return [(step, 1 - value) for step, value in series(key)]

        panels = [("information gain, nats/token", series("info_gain"), series("eval/info_gain")),
                  ("thought length, tokens", series("thought/len_mean"), series("eval/thought_len_mean")),
                  ("closed thoughts", closed("thought/truncated_frac"), closed("eval/truncated_frac"))]
        if not series("info_gain") and not series("eval/info_gain"):
            return None
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
        for ax, (title, per_step, held_out) in zip(axes, panels):
            if per_step:
                ax.plot(*zip(*per_step), color="0.8", lw=0.8, label="per step")
                ax.plot(*zip(*smoothed(per_step)), color="C0", label=f"per step, smoothed ({smoothing} EMA)")
            if held_out:
                ax.plot(*zip(*held_out), "o-", color="C3", label="held-out")
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        out = self.run_dir / "training.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
