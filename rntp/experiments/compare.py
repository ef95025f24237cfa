"""`rntp compare`: runs grouped into designs across seeds, held-out metrics with bootstrap intervals,
each design's difference from a control, curves with bands; per-run training metrics as before.

A run's design is its config without what only tells seeds and folders apart (`train.seed`,
`data.seed`, `run_dir`, `resume`, `overwrite`, `log.*`); runs without a config.yaml are grouped by
name with a sweep's seed suffix (`__seed-<k>`, `-seed<k>`) removed.

Held-out values come from each run's evaluations: `eval_positions.jsonl` (every position's values,
written by training since it was added), `eval/*` in metrics.jsonl (means only: older runs) and
`eval/eval.json` (`rntp eval` on the run folder). Intervals are percentile bootstraps (95%) of the
mean over seeds x positions: each resample draws the seeds with replacement and, where the values at
every position are known, the shared held-out positions with replacement (the same draw for every
seed: they were evaluated on the same positions). A design's difference from the control draws the
positions once for both (paired: a position that is hard for one is hard for the other, and that
shared difficulty cancels) and each design's seeds on their own. Without per-position values the
bootstrap is over seeds alone, and a single seed without them has no interval.

The same is done per difficulty bucket (easy / medium / hard, cut once per evaluation set from the
starting model and saved with each position): the bucket's positions are resampled exactly as all
positions are overall; runs without saved buckets give their per-bucket means (`info_gain/easy`, ...).
"""

from __future__ import annotations

import csv
import html
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from rntp.config import flatten
from rntp.experiments.evaluate import BUCKETS, md_tables_to_html
from rntp.runfiles import read_jsonl

log = logging.getLogger(__name__)

# training metric -> whether higher is better (for "best"), per run
COMPARED = {
    "reward/mean": True, "info_gain": True, "score/with_think": True, "score/no_think": True,
    "thought/len_mean": None, "thought/truncated_frac": None,
    "eval/nll_no_think": False, "eval/nll_think_mean": False, "eval/info_gain": True,
}
PLOTTED = ["reward/mean", "info_gain", "eval/info_gain", "eval/nll_think_mean"]

# held-out metric -> (label, whether higher is better), per design
HELD_OUT = {
    "info_gain": ("information gain, nats/token", True),
    "info_gain_empty": ("... of an empty thought", True),
    "info_gain_content": ("... the thoughts' words add", True),
    "nll_no_think": ("no-think NLL, nats/token", False),
    "acc_no_think": ("accuracy, no thought", True),
    "acc_think": ("accuracy after a thought", True),
    "thought_len_mean": ("thought length, tokens", None),
}
BANDED = ["info_gain", "info_gain_content", "nll_no_think", "thought_len_mean"]
DIFFERENCES = ["info_gain", "info_gain_content", "nll_no_think"]  # also plotted as design - control

NOT_DESIGN = ("run_dir", "resume", "overwrite", "log", "train.seed", "data.seed")
SEED_SUFFIX = re.compile(r"(?:^|[_.-]+)seed[-_=]?\d+$")


# ---- bootstrap (pure numpy) ------------------------------------------------------------------------

@dataclass
class Interval:
    """A mean (or a difference of means) and its bootstrap interval; lo/hi are None when the data
    cannot give one (one seed and no per-position values)."""

    mean: float
    lo: float | None
    hi: float | None
    seeds: int  # seeds behind it (the smaller count for a difference)
    positions: int  # positions resampled (1: seeds only)
    paired: bool = False


def resample_counts(draws: np.ndarray, n: int) -> np.ndarray:
    """[B, n]: how often each of n items appears in each row of `draws` ([B, k] indices)."""
    rows = draws.shape[0]
    flat = (draws + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _grid_means(values: np.ndarray, seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Mean of values[seeds[b]][:, positions[b]] for every resample b, as counts x values x counts."""
    s, p = values.shape
    return np.einsum("bs,sp,bp->b", resample_counts(seeds, s), values, resample_counts(positions, p)) / (
        seeds.shape[1] * positions.shape[1])


def _bounds(stats: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_mean(values, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Mean of `values` [seeds, positions] with a percentile bootstrap interval: each of `resamples`
    draws seeds with replacement, then positions with replacement (one draw shared by all seeds).
    Draw order (for reproducing it): rng = default_rng(seed); seeds = rng.integers(S, size=(B, S));
    positions = rng.integers(P, size=(B, P))."""
    v = np.asarray(values, dtype=np.float64)
    s, p = v.shape
    if s * p == 1:
        return Interval(float(v.mean()), None, None, s, p)
    rng = np.random.default_rng(seed)
    seeds = rng.integers(s, size=(resamples, s))
    positions = rng.integers(p, size=(resamples, p))
    return Interval(float(v.mean()), *_bounds(_grid_means(v, seeds, positions), level), s, p)


def bootstrap_difference(a, b, paired: bool, resamples: int = 2000, seed: int = 0,
                         level: float = 0.95) -> Interval:
    """mean(a) - mean(b) for `a` [Sa, P] and `b` [Sb, P] (or [Sb, Pb] unpaired) with a percentile
    bootstrap interval. Seeds are drawn for each side on its own; positions once for both when
    `paired` (the same positions, columns in the same order), else for each side on its own.
    Draw order: seeds of a, seeds of b, then positions (paired) or positions of a, of b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    (sa, pa), (sb, pb) = a.shape, b.shape
    if paired and pa != pb:
        raise ValueError(f"paired values need the same positions ({pa} vs {pb})")
    diff = float(a.mean() - b.mean())
    if (sa * pa == 1) or (sb * pb == 1):
        return Interval(diff, None, None, min(sa, sb), min(pa, pb), paired)
    rng = np.random.default_rng(seed)
    seeds_a, seeds_b = rng.integers(sa, size=(resamples, sa)), rng.integers(sb, size=(resamples, sb))
    if paired:
        pos_a = pos_b = rng.integers(pa, size=(resamples, pa))
    else:
        pos_a, pos_b = rng.integers(pa, size=(resamples, pa)), rng.integers(pb, size=(resamples, pb))
    stats = _grid_means(a, seeds_a, pos_a) - _grid_means(b, seeds_b, pos_b)
    return Interval(diff, *_bounds(stats, level), min(sa, sb), min(pa, pb), paired)


# ---- runs, their evaluations and designs ------------------------------------------------------------

@dataclass
class Evaluation:
    """One held-out evaluation of a run: the means, and (when saved) the value at every position."""

    step: int
    metrics: dict
    keys: list[str] | None = None
    values: dict[str, list[float]] | None = None
    buckets: list[str] | None = None  # each position's difficulty bucket, in `keys` order


def load_evaluations(run_dir: Path, rows: list[dict]) -> list[Evaluation]:
    """The run's held-out evaluations by step, from metrics.jsonl's eval/*, eval_positions.jsonl and
    eval/eval.json (whichever exist; per-position values where any of them has them)."""
    evals: dict[int, Evaluation] = {}
    for r in rows:
        if r.get("eval/info_gain") is not None:
            evals[r["step"]] = Evaluation(r["step"], {k[5:]: v for k, v in r.items() if k.startswith("eval/")})
    positions = run_dir / "eval_positions.jsonl"
    for r in read_jsonl(positions) if positions.exists() else []:
        entry = evals.setdefault(r["step"], Evaluation(r["step"], {}))
        entry.keys, entry.values, entry.buckets = r["keys"], r["values"], r.get("buckets")
        for name, vals in r["values"].items():  # means from the values where metrics.jsonl lacks them
            entry.metrics.setdefault(name, float(np.mean(vals)))
            for b in BUCKETS if entry.buckets else ():
                inside = [v for v, label in zip(vals, entry.buckets) if label == b]
                entry.metrics.setdefault(f"{name}/{b}", float(np.mean(inside)) if inside else None)
    report = run_dir / "eval" / "eval.json"
    if report.exists():
        for result in json.loads(report.read_text()).get("results", []):
            if result.get("step") is None:
                continue
            entry = evals.setdefault(result["step"], Evaluation(result["step"], dict(result.get("metrics", {}))))
            per = result.get("per_position")
            if per and entry.values is None:
                entry.keys, entry.values, entry.buckets = per["keys"], per["values"], per.get("buckets")
    return [evals[s] for s in sorted(evals)]


def load_run(run_dir: Path) -> dict:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (not a run folder)")
    rows = read_jsonl(metrics)  # a torn last line is dropped; other bad lines are named
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.exists() else None
    return {"name": run_dir.name, "dir": str(run_dir), "rows": rows, "config": config,
            "evals": load_evaluations(run_dir, rows)}


def design_settings(config: dict) -> dict:
    """The flattened config without what does not make a design (seeds, folders, logging)."""
    return {k: v for k, v in flatten(config).items()
            if not any(k == d or k.startswith(d + ".") for d in NOT_DESIGN)}


def design_name(run_name: str) -> str:
    """A run's name without a sweep's seed suffix: `control__seed-2` -> `control`."""
    return SEED_SUFFIX.sub("", run_name) or "run"


@dataclass
class Design:
    name: str
    runs: list[dict]
    settings: dict | None  # design_settings of its config (None: runs without config.yaml)
    differs: dict = field(default_factory=dict)  # the settings that differ between the compared designs


def group_designs(runs: list[dict]) -> list[Design]:
    """Runs with equal design settings (or, without a config, equal names less the seed) as one design each,
    in the order their first run was given."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        key = json.dumps(design_settings(r["config"]), sort_keys=True, default=str) if r["config"] is not None \
            else "name:" + design_name(r["name"])
        groups.setdefault(key, []).append(r)
    designs, taken = [], Counter()
    for members in groups.values():
        name = Counter(design_name(r["name"]) for r in members).most_common(1)[0][0]
        taken[name] += 1
        name = name if taken[name] == 1 else f"{name}#{taken[name]}"
        config = members[0]["config"]
        designs.append(Design(name, members, design_settings(config) if config is not None else None))
    known = [d.settings for d in designs if d.settings is not None]
    varying = {k for k in set().union(*known) if len({json.dumps(s.get(k), default=str) for s in known}) > 1} \
        if len(known) > 1 else set()
    for d in designs:
        d.differs = {k: d.settings.get(k) for k in sorted(varying)} if d.settings is not None else {}
    return designs


def values_at(runs: list[dict], metric: str, step: int | None = None, keys: list[str] | None = None,
              bucket: str | None = None) -> tuple[np.ndarray, list[str] | None] | None:
    """[seeds, positions] values of a metric at `step` (None: each run's final evaluation): over the
    positions all the runs share (or `keys`, in that order) when every run has per-position values,
    else each run's mean as one column. `bucket`: only the positions of that difficulty bucket (each
    run's mean over it, `<metric>/<bucket>`, where buckets were not saved). None when a run has no
    such evaluation."""
    mean_name = f"{metric}/{bucket}" if bucket else metric
    chosen = []
    for r in runs:
        evals = [e for e in r["evals"] if (step is None or e.step == step) and e.metrics.get(mean_name) is not None]
        if not evals:
            return None
        chosen.append(evals[-1])
    per_position = all(e.values is not None and metric in e.values and (bucket is None or e.buckets is not None)
                       for e in chosen)
    if per_position:
        if keys is None:
            shared = set(chosen[0].keys).intersection(*(e.keys for e in chosen[1:]))
            if bucket:  # positions every run puts in the bucket (runs of one evaluation set agree on all)
                for e in chosen:
                    shared &= {k for k, b in zip(e.keys, e.buckets) if b == bucket}
            keys = [k for k in chosen[0].keys if k in shared]
        if keys:
            maps = [dict(zip(e.keys, e.values[metric])) for e in chosen]
            if all(all(k in m for k in keys) for m in maps):
                return np.array([[m[k] for k in keys] for m in maps], dtype=np.float64), keys
    return np.array([[float(e.metrics[mean_name])] for e in chosen], dtype=np.float64), None


def final_steps(design: Design) -> list[int]:
    return [r["evals"][-1].step if r["evals"] else None for r in design.runs]


def summarise_designs(designs: list[Design], control: Design | None, resamples: int, seed: int) -> list[dict]:
    """One row per design, held-out metric and bucket (None: all positions; then easy, medium, hard): its mean
    and interval, and its difference from the control."""
    out = []
    for bucket in (None, *BUCKETS):
        for d in designs:
            for metric in HELD_OUT:
                got = values_at(d.runs, metric, bucket=bucket)
                if got is None:
                    continue
                values, _ = got
                row = {"design": d.name, "metric": metric, "bucket": bucket,
                       "interval": bootstrap_mean(values, resamples, seed)}
                if control is not None and d is not control:
                    row["difference"] = difference(d, control, metric, resamples, seed, bucket=bucket)
                out.append(row)
    return out


def difference(design: Design, control: Design, metric: str, resamples: int, seed: int,
               step: int | None = None, bucket: str | None = None) -> Interval | None:
    """design - control at their final evaluations (or at `step`), paired over the positions both share
    (those of `bucket` only, when given)."""
    a, b = values_at(design.runs, metric, step, bucket=bucket), values_at(control.runs, metric, step, bucket=bucket)
    if a is None or b is None:
        return None
    (va, ka), (vb, kb) = a, b
    if ka is not None and kb is not None:
        shared = [k for k in ka if k in set(kb)]
        if shared:
            va, _ = values_at(design.runs, metric, step, shared, bucket)
            vb, _ = values_at(control.runs, metric, step, shared, bucket)
            return bootstrap_difference(va, vb, True, resamples, seed)
    return bootstrap_difference(va, vb, False, resamples, seed)


def find_control(designs: list[Design], name: str | None) -> Design | None:
    """The design named `name` (or holding a run of that name); without a name, the one design with
    grpo.pg_coef=0 if there is exactly one."""
    if name is None:
        zero = [d for d in designs if d.settings is not None and d.settings.get("grpo.pg_coef") == 0]
        return zero[0] if len(zero) == 1 else None
    for d in designs:
        if d.name == name or any(r["name"] == name for r in d.runs):
            return d
    raise ValueError(f"--control {name!r} is not one of the designs: {', '.join(d.name for d in designs)}")


# ---- tables and plots --------------------------------------------------------------------------------

def summarise(run: dict) -> dict:
    out = {"run": run["name"], "steps": run["rows"][-1]["step"] if run["rows"] else 0}
    for key, higher in COMPARED.items():
        series = [r[key] for r in run["rows"] if r.get(key) is not None]
        out[f"{key} final"] = series[-1] if series else None
        if higher is not None:
            out[f"{key} best"] = (max if higher else min)(series) if series else None
    return out


def show(iv: Interval | None, sign: str = "") -> str:
    if iv is None:
        return ""
    text = f"{iv.mean:{sign}.3f}"
    return text + (f" [{iv.lo:{sign}.3f}, {iv.hi:{sign}.3f}]" if iv.lo is not None else " [no interval]")


def compare(run_dirs: list[str], out_dir: Path, control: str | None = None, resamples: int = 2000,
            seed: int = 0) -> Path:
    runs = [load_run(Path(d)) for d in run_dirs]
    designs = group_designs(runs)
    base = find_control(designs, control)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = [summarise(r) for r in runs]
    columns = [c for c in table[0] if any(row.get(c) is not None for row in table)]
    with open(out_dir / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    held = summarise_designs(designs, base, resamples, seed)
    write_design_csv(held, base, out_dir / "designs.csv")
    fmt = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    md = [f"# RNTP comparison: {len(runs)} runs, {len(designs)} designs", ""]
    design_md, diff_md = design_tables(designs, held, base, resamples)
    md += design_md + diff_md + ["## Runs", ""]
    md += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    md += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in table]
    plots = _band_plots(designs, out_dir, resamples, seed, base) + _plots(runs, out_dir)
    (out_dir / "compare.md").write_text("\n".join(md + [""] + [f"![{p.stem}]({p.name})" for p in plots]) + "\n")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(row.get(c)))}</td>" for c in columns) + "</tr>"
                   for row in table)
    images = "".join(f"<h3>{html.escape(p.stem)}</h3><img src='{p.name}'>" for p in plots)
    report = out_dir / "report.html"
    report.write_text(f"<html><head><meta charset='utf-8'><title>RNTP comparison</title></head><body>"
                      f"<h1>RNTP comparison of {len(runs)} runs, {len(designs)} designs</h1>"
                      f"{md_tables_to_html(design_md + diff_md)}<h2>Runs</h2>"
                      f"<table border=1 cellpadding=4><tr>{head}</tr>{body}</table>{images}</body></html>")
    return report


def design_tables(designs: list[Design], held: list[dict], control: Design | None,
                  resamples: int) -> tuple[list[str], list[str]]:
    """Markdown: each design's held-out means with intervals; each design minus the control; the same by
    difficulty bucket."""
    if not held:
        return [], []
    by = {(r["design"], r["metric"]): r for r in held if r["bucket"] is None}
    if not by:
        return [], []
    metrics = [m for m in HELD_OUT if any(k[1] == m for k in by)]
    lines = ["## Designs: held-out metrics at the final evaluation", "",
             f"Mean over seeds and held-out positions [95% bootstrap interval, {resamples} resamples over seeds and "
             "positions; seeds alone where per-position values were not saved].", "",
             "| design | seeds | positions | final step | settings | " + " | ".join(HELD_OUT[m][0] for m in metrics)
             + " |", "|---" * (len(metrics) + 5) + "|"]
    for d in designs:
        first = by.get((d.name, metrics[0]))
        if first is None:
            continue
        iv = first["interval"]
        steps = sorted({s for s in final_steps(d) if s is not None})
        settings = ", ".join(f"{k}={v}" for k, v in d.differs.items()) or ""
        lines.append(f"| {d.name} | {len(d.runs)} | {iv.positions if iv.positions > 1 else 'means only'} | "
                     f"{'/'.join(map(str, steps))} | {settings} | "
                     + " | ".join(show(by[(d.name, m)]["interval"]) if (d.name, m) in by else "" for m in metrics)
                     + " |")
    lines.append("")
    if control is None:
        return lines + bucket_tables(designs, held, None), []
    diff = [f"## Difference from the control `{control.name}` (design − control)", "",
            "Paired over the held-out positions both share (the same positions resampled for both), seeds "
            "resampled within each design; an interval that excludes 0 is a difference these seeds and "
            "positions resolve.", "",
            "| design | paired | " + " | ".join(HELD_OUT[m][0] for m in metrics) + " |",
            "|---" * (len(metrics) + 2) + "|"]
    for d in designs:
        if d is control or (d.name, metrics[0]) not in by:
            continue
        cells = [by[(d.name, m)].get("difference") if (d.name, m) in by else None for m in metrics]
        first = next((c for c in cells if c is not None), None)
        paired = f"yes ({first.positions} positions)" if first is not None and first.paired else "no"
        diff.append(f"| {d.name} | {paired} | " + " | ".join(show(c, "+") for c in cells) + " |")
    return lines, diff + [""] + bucket_tables(designs, held, control)


def bucket_tables(designs: list[Design], held: list[dict], control: Design | None) -> list[str]:
    """Markdown: each design's held-out means by difficulty bucket and, with a control, design - control
    per bucket, with the same intervals as overall (paired over the bucket's positions)."""
    by = {(r["design"], r["metric"], r["bucket"]): r for r in held if r["bucket"] is not None}
    metrics = [m for m in HELD_OUT if any(k[1] == m for k in by)]
    if not metrics:
        return []
    head = " | ".join(HELD_OUT[m][0] for m in metrics)
    lines = ["## By difficulty: held-out metrics per bucket at the final evaluation", "",
             "Buckets as the evaluation cut them (the starting model's difficulty at each position, the same for "
             "every run of an evaluation set); intervals as above, over the bucket's positions.", "",
             f"| design | bucket | positions | {head} |", "|---" * (len(metrics) + 3) + "|"]
    for bucket in BUCKETS:
        for d in designs:
            first = next((by[(d.name, m, bucket)] for m in metrics if (d.name, m, bucket) in by), None)
            if first is None:
                continue
            n = first["interval"].positions
            lines.append(f"| {d.name} | {bucket} | {n if n > 1 else 'means only'} | " + " | ".join(
                show(by[(d.name, m, bucket)]["interval"]) if (d.name, m, bucket) in by else "" for m in metrics)
                + " |")
    lines.append("")
    if control is None:
        return lines
    lines += [f"## By difficulty: difference from the control `{control.name}` (design − control)", "",
              f"| design | bucket | paired | {head} |", "|---" * (len(metrics) + 3) + "|"]
    for bucket in BUCKETS:
        for d in designs:
            if d is control:
                continue
            cells = [by[(d.name, m, bucket)].get("difference") if (d.name, m, bucket) in by else None for m in metrics]
            first = next((c for c in cells if c is not None), None)
            if first is None:
                continue
            paired = f"yes ({first.positions} positions)" if first.paired else "no"
            lines.append(f"| {d.name} | {bucket} | {paired} | " + " | ".join(show(c, "+") for c in cells) + " |")
    return lines + [""]


def write_design_csv(held: list[dict], control: Design | None, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["design", "metric", "bucket", "seeds", "positions", "mean", "lo", "hi", "control",
                         "difference", "difference_lo", "difference_hi", "paired"])
        for r in held:
            iv, d = r["interval"], r.get("difference")
            writer.writerow([r["design"], r["metric"], r["bucket"] or "all", iv.seeds, iv.positions, iv.mean, iv.lo,
                             iv.hi, control.name if control is not None else None, *(
                                 (d.mean, d.lo, d.hi, d.paired) if d is not None else (None,) * 4)])


def curve(design: Design, metric: str, resamples: int, seed: int) -> list[tuple[int, Interval]]:
    """The design's held-out metric at every step all its runs evaluated, each with its interval."""
    steps = set.intersection(*({e.step for e in r["evals"] if e.metrics.get(metric) is not None}
                               for r in design.runs))
    points = []
    for step in sorted(steps):
        got = values_at(design.runs, metric, step)
        if got is not None:
            points.append((step, bootstrap_mean(got[0], resamples, seed)))
    return points


def difference_curve(design: Design, control: Design, metric: str, resamples: int,
                     seed: int) -> list[tuple[int, Interval]]:
    """design - control at every step both evaluated in all their runs, each with its (paired) interval."""
    steps = set.intersection(*({e.step for e in r["evals"] if e.metrics.get(metric) is not None}
                               for r in design.runs + control.runs))
    points = [(step, difference(design, control, metric, resamples, seed, step)) for step in sorted(steps)]
    return [(step, iv) for step, iv in points if iv is not None]


def _band_plots(designs: list[Design], out_dir: Path, resamples: int, seed: int,
                control: Design | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    plots = [(metric, None) for metric in BANDED] + [(metric, control) for metric in DIFFERENCES if control]
    for metric, against in plots:
        if against is None:
            curves = [(d.name, curve(d, metric, resamples, seed)) for d in designs]
        else:
            curves = [(d.name, difference_curve(d, against, metric, resamples, seed)) for d in designs
                      if d is not against]
        curves = [(n, pts) for n, pts in curves if pts]
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, pts in curves:
            steps = [s for s, _ in pts]
            line, = ax.plot(steps, [iv.mean for _, iv in pts], marker=".", label=f"{name} ({pts[0][1].seeds} seeds)")
            if all(iv.lo is not None for _, iv in pts):
                ax.fill_between(steps, [iv.lo for _, iv in pts], [iv.hi for _, iv in pts], alpha=0.2,
                                color=line.get_color())
        if against is not None:
            ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"held-out {HELD_OUT[metric][0]}" + (f" minus {against.name}" if against else "")
                     + " (95% bootstrap band)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / (f"heldout_{metric}" + ("_minus_control" if against else "") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _plots(runs: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key in PLOTTED:
        series = [(r["name"], [(row["step"], row[key]) for row in r["rows"] if row.get(key) is not None]) for r in runs]
        series = [(n, pts) for n, pts in series if pts]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, pts in series:
            ax.plot(*zip(*pts), marker=".", label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / (key.replace("/", "_") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
