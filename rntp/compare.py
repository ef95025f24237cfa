"""`rntp compare`: final and best metrics of several runs, plots against step, one HTML report."""

from __future__ import annotations

import csv
import html
from pathlib import Path

from rntp.runfiles import read_jsonl

# metric -> whether higher is better (for "best")
COMPARED = {
    "reward/mean": True, "info_gain": True, "score/with_think": True, "score/no_think": True,
    "thought/len_mean": None, "thought/truncated_frac": None,
    "eval/nll_no_think": False, "eval/nll_think_mean": False, "eval/info_gain": True,
}
PLOTTED = ["reward/mean", "info_gain", "eval/info_gain", "eval/nll_think_mean"]


def load_run(run_dir: Path) -> dict:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (not a run folder)")
    rows = read_jsonl(metrics)  # a torn last line is dropped; other bad lines are named
    return {"name": run_dir.name, "dir": str(run_dir), "rows": rows}


def summarise(run: dict) -> dict:
    out = {"run": run["name"], "steps": run["rows"][-1]["step"] if run["rows"] else 0}
    for key, higher in COMPARED.items():
        series = [r[key] for r in run["rows"] if r.get(key) is not None]
        out[f"{key} final"] = series[-1] if series else None
        if higher is not None:
            out[f"{key} best"] = (max if higher else min)(series) if series else None
    return out


def compare(run_dirs: list[str], out_dir: Path) -> Path:
    runs = [load_run(Path(d)) for d in run_dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    table = [summarise(r) for r in runs]
    columns = [c for c in table[0] if any(row.get(c) is not None for row in table)]
    with open(out_dir / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    fmt = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    md = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    md += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in table]
    plots = _plots(runs, out_dir)
    (out_dir / "compare.md").write_text("\n".join(md + [""] + [f"![{p.stem}]({p.name})" for p in plots]) + "\n")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(row.get(c)))}</td>" for c in columns) + "</tr>"
                   for row in table)
    images = "".join(f"<h3>{html.escape(p.stem)}</h3><img src='{p.name}'>" for p in plots)
    report = out_dir / "report.html"
    report.write_text(f"<html><head><meta charset='utf-8'><title>RNTP comparison</title></head><body>"
                      f"<h1>RNTP comparison of {len(runs)} runs</h1><table border=1 cellpadding=4><tr>{head}</tr>"
                      f"{body}</table>{images}</body></html>")
    return report


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
