"""Held-out evaluation: does thinking help a checkpoint predict text it never trained on?

Positions are drawn once from the held-out data with a fixed seed, so every checkpoint is
measured on identical positions. For each position: the no-think NLL of the H target tokens,
k sampled thoughts with their scores, greedy accuracy with and without thinking, and the base
model's difficulty there (its next-token entropy, or -log p of the true next token), which puts the
position in one of three buckets, easy / medium / hard, fixed once per evaluation set so that every
checkpoint is read on the same buckets. Output schema: see `SCHEMA` below.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rntp import console
from rntp.forward.scoring import next_token_difficulty, score_groups
from rewards.functions import token_bytes_fn
from rntp.config import Config
from rntp.data import Position, PositionStream
from rollout import SamplingSpec, ThinkTags
from rollout.spans import Rollout, pad_id_of

log = logging.getLogger(__name__)

SCHEMA = {
    "schema": "rntp.eval/1",
    "fields": {
        "nll_no_think": "mean NLL of target tokens without a thought, nats/token",
        "bpb_no_think": "the same in bits per UTF-8 byte of the targets",
        "nll_think_mean": "mean over thoughts of the target NLL after the thought, nats/token",
        "nll_think_marginal": "-log(mean_k p(target | thought_k)) / H: the marginal over thoughts",
        "nll_think_best": "NLL after the best of the k thoughts, nats/token",
        "bpb_think_mean": "nll_think_mean in bits per byte",
        "info_gain": "nll_no_think - nll_think_mean (nats/token; > 0 means thinking helps)",
        "info_gain_marginal": "nll_no_think - nll_think_marginal",
        "nll_empty_thought": "target NLL after an empty thought (the tags alone), nats/token",
        "info_gain_empty": "nll_no_think - nll_empty_thought: what the tags alone cost (< 0) or give",
        "info_gain_content": "info_gain - info_gain_empty: what the thoughts' words add over an empty thought",
        "<metric>/<bucket>": "info_gain, info_gain_empty, info_gain_content, nll_no_think, acc_no_think, "
                             "acc_think and thought_len_mean over the positions of one difficulty bucket (easy, "
                             "medium, hard; None when empty); weighted by positions/<bucket>, they add up to the "
                             "overall metric",
        "positions/<bucket>": "number of positions in the bucket",
        "bucket_easy_below, bucket_hard_above": "the thresholds the buckets were cut at (nats of `buckets.by`)",
        "acc_no_think": "teacher-forced greedy top-1 accuracy on the target tokens, no thought",
        "acc_think": "the same after each thought, averaged over thoughts",
        "thought_len_mean/p50/p90/max": "sampled thought tokens",
        "truncated_frac": "thoughts that hit the budget without closing",
        "per_position": "each result's values at every position, for paired comparisons (`rntp compare`): "
                        "`keys` (a hash of the position's context and target ids) and `values` (metric -> one "
                        "number per position, in `keys` order); the metrics above are their means; `buckets` "
                        "(each position's difficulty bucket) and `difficulty` (its value). Absent in files "
                        "written before they were added",
    },
}

BUCKETS = ("easy", "medium", "hard")
# metrics reported per difficulty bucket as `<metric>/<bucket>` (means over positions, so they add back up)
BUCKETED = ("info_gain", "info_gain_empty", "info_gain_content", "nll_no_think", "acc_no_think", "acc_think",
            "thought_len_mean")

# per-position values kept by `evaluate_policy` (the metrics of the same names are their means over positions)
PER_POSITION = ("info_gain", "info_gain_empty", "info_gain_content", "nll_no_think", "nll_think_mean",
                "nll_empty_thought", "acc_no_think", "acc_think", "thought_len_mean", "truncated_frac")


def position_key(position: Position) -> str:
    """A position's identity across runs and evaluations: a hash of its context and target ids."""
    raw = json.dumps([position.context, position.target]).encode()
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def token_byte_lengths(tokenizer, ids: list[int]) -> list[int]:
    """UTF-8 bytes that each token stands for (exact for byte-level BPE, even for a token that
    holds part of a multi-byte character)."""
    token_bytes = token_bytes_fn(tokenizer)
    return [len(token_bytes(i)) for i in ids]


@dataclass
class EvalSet:
    positions: list[Position]
    difficulty: torch.Tensor  # [P] the starting model's difficulty at each position (nats, `eval.bucket_by`)
    target_bytes: torch.Tensor  # [P]
    skipped: dict
    buckets: list[str]  # [P] easy / medium / hard, cut once from `difficulty`
    thresholds: tuple[float, float]  # easy below the first, hard above the second


def bucket_thresholds(difficulty: torch.Tensor, how: str, easy_below: float, hard_above: float) -> tuple[float, float]:
    """Where the buckets are cut: the fixed thresholds, or the terciles of these positions' difficulties."""
    if how == "fixed":
        return easy_below, hard_above
    lo, hi = torch.quantile(difficulty.double(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)).tolist()
    return lo, hi


def assign_buckets(difficulty: torch.Tensor, thresholds: tuple[float, float]) -> list[str]:
    lo, hi = thresholds
    return ["easy" if d < lo else "hard" if d > hi else "medium" for d in difficulty.tolist()]


def bucket_means(per_position: dict[str, torch.Tensor], buckets: list[str]) -> dict:
    """`<metric>/<bucket>` (the mean over the bucket's positions, None for an empty bucket) and
    `positions/<bucket>`, for every metric in BUCKETED."""
    out = {}
    for b in BUCKETS:
        mask = torch.tensor([x == b for x in buckets], dtype=torch.bool)
        out[f"positions/{b}"] = int(mask.sum())
        for name in BUCKETED:
            out[f"{name}/{b}"] = float(per_position[name][mask].double().mean()) if mask.any() else None
    return out


def build_eval_set(cfg: Config, tokenizer, base_model) -> EvalSet:
    """The fixed positions: one pass over the held-out data, seeded by eval.seed."""
    e = cfg.eval
    # a separate held-out source is read whole; the training source's carve-out (data.heldout_fraction) otherwise
    data_cfg = cfg.data.model_copy(update={"source": e.data or cfg.data.source, "seed": e.seed, "shuffle": True,
                                           **({"heldout_fraction": 0.0} if e.data and e.data != cfg.data.source
                                              else {})})
    stream = PositionStream(data_cfg, tokenizer, split=e.split)
    positions = stream.first_epoch(e.num_positions)
    contexts = [p.context for p in positions]
    pad_id = pad_id_of(tokenizer)
    true_next = [p.target[0] for p in positions] if e.bucket_by == "logprob" else None
    difficulty = next_token_difficulty(base_model, contexts, pad_id, e.batch_positions, true_next)
    target_bytes = torch.tensor([sum(token_byte_lengths(tokenizer, p.target)) for p in positions])
    thresholds = bucket_thresholds(difficulty, e.buckets, e.easy_below, e.hard_above)
    return EvalSet(positions, difficulty, target_bytes, dict(stream.stats), assign_buckets(difficulty, thresholds),
                   thresholds)


def _quantiles(values: list[float]) -> dict:
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"thought_len_mean": sum(v) / len(v), "thought_len_p50": pick(0.5), "thought_len_p90": pick(0.9),
            "thought_len_max": v[-1]}


@torch.no_grad()
def evaluate_policy(model, sampler, tags: ThinkTags, evalset: EvalSet, cfg: Config, progress: bool = True) -> dict:
    """All metrics for one model on the fixed positions; also returns a few samples."""
    e, H = cfg.eval, cfg.data.horizon
    tokenizer = tags.tokenizer
    pad_id = pad_id_of(tokenizer)
    budget = e.max_thought_tokens or cfg.rollout.max_thought_tokens
    was_training = model.training
    model.eval()
    think, plain, empty, hits_think, hits_plain, lengths, closed, samples = [], [], [], [], [], [], [], []
    batches = range(0, len(evalset.positions), e.batch_positions)
    for b in tqdm(batches, desc="eval", disable=not progress, leave=False, file=console.terminal):
        chunk = evalset.positions[b : b + e.batch_positions]
        spec = SamplingSpec(e.thoughts, budget, e.temperature, 1.0, seed=e.seed * 1_000_003 + b)
        rollouts = sampler.sample([tags.prompt(p.context) for p in chunk], spec)
        # one more branch per position, an empty thought: what the tags alone do to the prediction
        blank = [Rollout(i, tags.prompt(p.context), list(tags.close_ids), n_sampled=0, closed=True)
                 for i, p in enumerate(chunk)]
        scored = score_groups(model, [p.context for p in chunk], rollouts + blank, [p.target for p in chunk],
                              pad_id=pad_id, micro_batch=cfg.train.micro_batch, autocast=cfg.model.autocast_bf16,
                              attention=cfg.train.attention)
        n = len(rollouts)
        sums = scored.target_logprobs.sum(-1).double()
        think.append(sums[:n].view(len(chunk), e.thoughts))
        empty.append(sums[n:])
        plain.append(scored.no_think_logprobs.sum(-1).double())
        hits_think.append(scored.target_greedy[:n].float().mean(-1).view(len(chunk), e.thoughts))
        hits_plain.append(scored.no_think_greedy.float().mean(-1))
        lengths += [r.n_sampled for r in rollouts]
        closed += [r.closed for r in rollouts]
        for i, (r, s) in enumerate(zip(rollouts, sums.tolist())):
            if len(samples) < e.samples and i % e.thoughts == 0:  # the first thought of each position
                p = chunk[r.group]
                samples.append({"context_tail": tokenizer.decode(p.context[-64:]),
                                "thought": tokenizer.decode(r.thought_ids), "target": tokenizer.decode(p.target),
                                "score": s, "no_think_score": float(scored.no_think_logprobs[r.group].sum())})
    model.train(was_training)
    think, plain, empty = torch.cat(think), torch.cat(plain), torch.cat(empty)  # [P, k], [P], [P] summed log-probs
    marginal = torch.logsumexp(think, -1) - math.log(e.thoughts)
    n_tokens = H * len(plain)
    ln2_bytes = math.log(2) * float(evalset.target_bytes.sum())
    m = {
        "nll_no_think": float(-plain.sum() / n_tokens),
        "bpb_no_think": float(-plain.sum() / ln2_bytes),
        "nll_think_mean": float(-think.mean(-1).sum() / n_tokens),
        "nll_think_marginal": float(-marginal.sum() / n_tokens),
        "nll_think_best": float(-think.max(-1).values.sum() / n_tokens),
        "nll_empty_thought": float(-empty.sum() / n_tokens),
        "bpb_think_mean": float(-think.mean(-1).sum() / ln2_bytes),
        # float64, like the per-bucket means, so that those add back up to these exactly
        "acc_no_think": float(torch.cat(hits_plain).double().mean()),
        "acc_think": float(torch.cat(hits_think).double().mean()),
        "truncated_frac": 1 - sum(closed) / len(closed),
        **_quantiles([float(x) for x in lengths]),
    }
    m["info_gain"] = m["nll_no_think"] - m["nll_think_mean"]
    m["info_gain_marginal"] = m["nll_no_think"] - m["nll_think_marginal"]
    m["info_gain_empty"] = m["nll_no_think"] - m["nll_empty_thought"]
    m["info_gain_content"] = m["info_gain"] - m["info_gain_empty"]
    k = e.thoughts
    per = {"nll_no_think": -plain / H, "nll_think_mean": -think.mean(-1) / H, "nll_empty_thought": -empty / H,
           "acc_no_think": torch.cat(hits_plain).double(), "acc_think": torch.cat(hits_think).double().mean(-1),
           "thought_len_mean": torch.tensor(lengths, dtype=torch.float64).view(-1, k).mean(-1),
           "truncated_frac": 1 - torch.tensor(closed, dtype=torch.float64).view(-1, k).mean(-1)}
    per["info_gain"] = per["nll_no_think"] - per["nll_think_mean"]
    per["info_gain_empty"] = per["nll_no_think"] - per["nll_empty_thought"]
    per["info_gain_content"] = per["info_gain"] - per["info_gain_empty"]
    m.update(bucket_means(per, evalset.buckets))
    m["bucket_easy_below"], m["bucket_hard_above"] = evalset.thresholds
    per_position = {"keys": [position_key(p) for p in evalset.positions], "buckets": evalset.buckets,
                    "difficulty": evalset.difficulty.tolist(),
                    "values": {name: per[name].tolist() for name in PER_POSITION}}
    return {"metrics": m, "samples": samples, "per_position": per_position}


# ---- `rntp eval`: one or many models / checkpoints, with a report --------------------------------

def run_config_of(path: str | Path) -> Path | None:
    """The rntp config a model path was trained with: a run folder's config.yaml, or a checkpoint's
    rntp_config.yaml (its run folder's config.yaml if the checkpoint lacks one); None for other paths."""
    path = Path(path)
    for candidate in (path / "config.yaml", path / "rntp_config.yaml"):
        if candidate.is_file():
            return candidate
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent / "config.yaml"
    return None


def eval_config(model_paths: list[str], config: str | None, overrides: list[str]) -> tuple[Config, str]:
    """`rntp eval`'s config and where it came from: `--config` when given, else the first `--model` that is
    a run folder or checkpoint (its own config, so held-out positions, tags, horizon and thought budget are
    the run's), else the defaults. Overrides apply on top of either."""
    from rntp.config import load_config

    if config is not None:
        return load_config(config, overrides), str(config)
    found = next((c for c in map(run_config_of, model_paths) if c is not None), None)
    return load_config(found, overrides), str(found) if found else "defaults (no --config, no run config found)"


def discover(paths: list[str]) -> list[dict]:
    """Expand run folders into [base model, checkpoint 1, checkpoint 2, ...]."""
    import yaml

    from rntp.checkpoint import checkpoint_problem
    from rntp.think_tokens import base_model_path

    found = []
    for path in paths:
        run = Path(path)
        ckpts = sorted((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []
        if ckpts:
            config = run / "config.yaml"
            if config.exists():
                run_cfg = Config.model_validate(yaml.safe_load(config.read_text()))  # the run's own tags
                found.append({"label": f"base ({run_cfg.model.name_or_path})", "step": 0,
                              "path": base_model_path(run_cfg)})
            for c in ckpts:
                if problem := checkpoint_problem(c):  # a damaged checkpoint is named and left out
                    log.warning("skipping damaged checkpoint %s: %s", c, problem)
                    continue
                found.append({"label": c.name, "step": int(c.name.split("_")[1]), "path": model_or_adapter(c)})
        else:
            found.append({"label": Path(path).name or path, "step": None, "path": model_or_adapter(path)})
    return found


def model_or_adapter(path) -> str:
    """A model path, checked (`resolve_model_path`), or a LoRA checkpoint's folder (merged when evaluated)."""
    from rntp import lora
    from rntp.prepare import resolve_model_path

    return str(path) if lora.is_adapter_folder(path) else resolve_model_path(str(path))


def run_eval(model_paths: list[str], cfg: Config, out_dir: Path, sampler_kind: str = "auto") -> dict:
    from transformers import AutoTokenizer

    from rntp import lora
    from rntp.prepare import resolve_model_path
    from rntp.models import load_policy
    from rollout import make_sampler

    models = discover(model_paths)  # every path is checked before any model loads
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(models[0]["path"])
    base = load_policy(resolve_model_path(cfg.eval.base_model or cfg.model.name_or_path), cfg)
    evalset = build_eval_set(cfg, tokenizer, base)
    del base
    tags = ThinkTags(tokenizer, cfg.rollout.open_tag, cfg.rollout.close_tag)
    results = []
    for entry in tqdm(models, desc="models", disable=len(models) == 1, file=console.terminal):
        if len(AutoTokenizer.from_pretrained(entry["path"])) != len(tokenizer):
            raise ValueError(f"{entry['path']} has a different tokenizer; positions would not be comparable")
        with lora.plain_model_path(entry["path"]) as path:  # a LoRA checkpoint: merged into its base, for a while
            model = load_policy(path, cfg)
            budget = cfg.eval.max_thought_tokens or cfg.rollout.max_thought_tokens
            sampler = make_sampler(sampler_kind, path, tags, policy=model, dtype=cfg.model.dtype,
                                   seed=cfg.eval.seed, max_model_len=cfg.data.chunk_tokens + budget + 16,
                                   vllm_cfg=cfg.rollout.vllm)
            result = evaluate_policy(model, sampler, tags, evalset, cfg)
            sampler.close()
        results.append({**entry, **result})
        log.info("%s: %s", entry["label"], {k: round(v, 4) for k, v in result["metrics"].items()
                                             if isinstance(v, float)})
        m = result["metrics"]
        console.say(f"{entry['label']}: information gain {m['info_gain']:+.3f} nats/token, no-think NLL "
                    f"{m['nll_no_think']:.3f}, thought length {m['thought_len_mean']:.1f}")
    lo, hi = evalset.thresholds
    report = {**SCHEMA, "data": cfg.eval.data or cfg.data.source, "split": cfg.eval.split,
              "positions": len(evalset.positions), "seed": cfg.eval.seed, "thoughts": cfg.eval.thoughts,
              "horizon": cfg.data.horizon, "skipped": evalset.skipped,
              "buckets": {"by": cfg.eval.bucket_by, "how": cfg.eval.buckets, "easy_below": lo, "hard_above": hi},
              "results": results}
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    write_tables(report, out_dir)
    console.say("\n" + "\n".join(bucket_table(report)))  # the per-bucket rows, on the terminal too
    return report


TABLE_KEYS = ["nll_no_think", "nll_think_mean", "nll_think_marginal", "nll_think_best", "info_gain",
              "info_gain_empty", "info_gain_content",
              "info_gain/easy", "info_gain/medium", "info_gain/hard", "bpb_no_think", "acc_no_think", "acc_think",
              "thought_len_mean", "truncated_frac"]
CSV_KEYS = TABLE_KEYS + [f"{m}/{b}" for b in BUCKETS for m in BUCKETED if f"{m}/{b}" not in TABLE_KEYS] + [
    f"positions/{b}" for b in BUCKETS]

# the per-bucket columns of every report
BUCKET_LABELS = {"info_gain": "information gain", "info_gain_empty": "... empty thought",
                 "info_gain_content": "... the words", "nll_no_think": "no-think NLL",
                 "acc_no_think": "accuracy, no thought", "acc_think": "accuracy after a thought",
                 "thought_len_mean": "thought length"}


def buckets_note(by: str, easy_below, hard_above) -> str:
    """One line that says how the buckets were cut."""
    what = {"entropy": "next-token entropy", "logprob": "-log p of the true next token"}.get(by, by)
    cut = f"easy below {easy_below:.2f}, hard above {hard_above:.2f} nats" if easy_below is not None else ""
    return f"By difficulty (the starting model's {what} at each position; {cut}; the same buckets for every model)"


def bucket_table(report: dict) -> list[str]:
    """Markdown: one row per model and difficulty bucket (`rntp eval`'s eval.md and terminal)."""
    b = report.get("buckets", {})
    fmt = lambda v: "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [buckets_note(b.get("by", "entropy"), b.get("easy_below"), b.get("hard_above")) + ":", "",
             "| model | step | bucket | positions | " + " | ".join(BUCKET_LABELS.values()) + " |",
             "|---|---|---|---:" + "|---:" * len(BUCKET_LABELS) + "|"]
    for r in report["results"]:
        m = r["metrics"]
        lines += [f"| {r['label']} | {fmt(r['step'])} | {bucket} | {m.get(f'positions/{bucket}')} | "
                  + " | ".join(fmt(m.get(f"{k}/{bucket}")) for k in BUCKET_LABELS) + " |" for bucket in BUCKETS]
    return lines


def write_tables(report: dict, out_dir: Path) -> None:
    rows = report["results"]
    with open(out_dir / "eval.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "step", *CSV_KEYS])
        for r in rows:
            writer.writerow([r["label"], r["step"], *(r["metrics"].get(k) for k in CSV_KEYS)])
    fmt = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"# Evaluation on {report['data']} ({report['positions']} positions, k={report['thoughts']}, "
             f"H={report['horizon']}, seed {report['seed']})", "",
             "| model | step | " + " | ".join(TABLE_KEYS) + " |", "|---" * (len(TABLE_KEYS) + 2) + "|"]
    lines += [f"| {r['label']} | {fmt(r['step'])} | " + " | ".join(fmt(r["metrics"].get(k)) for k in TABLE_KEYS)
              + " |" for r in rows]
    lines += ["", *bucket_table(report)]
    plot = plot_against_step(rows, out_dir)
    if plot:
        lines += ["", f"![metrics against step]({plot.name})"]
    lines += ["", "## Sample thoughts", ""]
    for r in rows[-1:]:
        for s in r["samples"]:
            lines += [f"- **context** …{s['context_tail']!r}", f"  **thought** {s['thought']!r}",
                      f"  **target** {s['target']!r} (score {s['score']:.2f}, no-think {s['no_think_score']:.2f})"]
    (out_dir / "eval.md").write_text("\n".join(lines) + "\n")

    body = "".join(f"<tr><td>{html.escape(r['label'])}</td><td>{fmt(r['step'])}</td>"
                   + "".join(f"<td>{fmt(r['metrics'].get(k))}</td>" for k in TABLE_KEYS) + "</tr>" for r in rows)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["model", "step", *TABLE_KEYS])
    (out_dir / "eval.html").write_text(
        f"<html><head><meta charset='utf-8'><title>RNTP eval</title></head><body>"
        f"<h1>Evaluation on {html.escape(str(report['data']))}</h1><table border=1 cellpadding=4>"
        f"<tr>{head}</tr>{body}</table>{md_tables_to_html(bucket_table(report))}"
        + (f"<p><img src='{plot.name}'></p>" if plot else "") + "</body></html>")


def plot_against_step(rows: list[dict], out_dir: Path) -> Path | None:
    stepped = [r for r in rows if r["step"] is not None]
    if len(stepped) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("nll_no_think", "nll_think_mean", "nll_think_marginal"), ("info_gain",), ("acc_no_think", "acc_think")]
    fig, axes = plt.subplots(1, len(keys), figsize=(15, 3.8))
    for ax, group in zip(axes, keys):
        for k in group:
            ax.plot([r["step"] for r in stepped], [r["metrics"][k] for r in stepped], marker="o", label=k)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = out_dir / "eval.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---- during training: the held-out curve and the before/after table --------------------------------

REPORT_KEYS = [
    ("info_gain", "information gain, nats/token (> 0: thinking helps)"),
    ("info_gain_empty", "... of an empty thought (the tags alone)"),
    ("info_gain_content", "... that the thoughts' words add over an empty one"),
    ("nll_no_think", "no-think NLL, nats/token"),
    ("nll_think_mean", "NLL after a thought, nats/token"),
    ("acc_no_think", "top-1 accuracy, no thought"),
    ("acc_think", "top-1 accuracy after a thought"),
    ("thought_len_mean", "thought length, tokens"),
    ("truncated_frac", "thoughts that hit the budget"),
]


def held_out_report(rows: list[dict], samples: list[dict] | None = None, bucket_by: str = "entropy") -> str | None:
    """Markdown from a run's metrics rows: the first held-out evaluation (step 0 = the base model)
    against the last, overall and by difficulty bucket, then every evaluation (the curve) and a few of
    the last evaluation's thoughts; None if the run evaluated nothing."""
    evals = [r for r in rows if r.get("eval/info_gain") is not None]
    if not evals:
        return None
    first, last = evals[0], evals[-1]
    n = int(sum(first.get(f"eval/positions/{b}") or 0 for b in ("easy", "medium", "hard")))
    fmt = lambda v, sign="": "" if v is None else f"{v:{sign}.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    name = lambda r: "base model (step 0)" if r["step"] == 0 else f"step {r['step']}"  # noqa: E731
    lines = [f"Held-out text, the same {n} positions for every model:", "",
             f"| | {name(first)} | {name(last)} | change |", "|---|---:|---:|---:|"]
    for key, label in REPORT_KEYS:
        a, b = first.get(f"eval/{key}"), last.get(f"eval/{key}")
        numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
        change = fmt(float(b - a), "+") if numbers else ""
        if numbers and key == "nll_no_think" and a:
            change += f" ({(b - a) / a:+.1%})"  # the language model without thinking should not get worse
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {change} |")
    lines += ["", *bucket_change_table(first, last, bucket_by)]
    keys = [k for k, _ in REPORT_KEYS]
    lines += ["", "## Every evaluation", "", "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {r['step']} | " + " | ".join(fmt(r.get(f"eval/{k}")) for k in keys) + " |" for r in evals]
    if samples:
        lines += ["", f"## Thoughts at step {last['step']}", ""]
        for s in samples:
            lines += [f"- …{s['context_tail'][-80:]!r} **{s['thought']!r}** {s['target']!r} "
                      f"(target log-prob {s['score']:.2f}, without the thought {s['no_think_score']:.2f})"]
    return "\n".join(lines) + "\n"


def bucket_change_table(first: dict, last: dict, bucket_by: str) -> list[str]:
    """Markdown: each difficulty bucket's metrics at the first and the last evaluation (metrics rows, eval/*)."""
    if all(first.get(f"eval/positions/{b}") is None for b in BUCKETS):
        return []
    fmt = lambda v: "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    arrow = lambda a, z: "" if a is None and z is None else f"{fmt(a)} → {fmt(z)}"  # noqa: E731
    lines = [buckets_note(bucket_by, first.get("eval/bucket_easy_below"), first.get("eval/bucket_hard_above"))
             + f", step {first['step']} → step {last['step']}:", "",
             "| bucket | positions | " + " | ".join(BUCKET_LABELS.values()) + " | change in information gain |",
             "|---|---:" + "|---:" * (len(BUCKET_LABELS) + 1) + "|"]
    for b in BUCKETS:
        a, z = first.get(f"eval/info_gain/{b}"), last.get(f"eval/info_gain/{b}")
        change = f"{z - a:+.3f}" if a is not None and z is not None else ""
        count = last.get(f"eval/positions/{b}")
        lines.append(f"| {b} | {'' if count is None else int(count)} | "
                     + " | ".join(arrow(first.get(f"eval/{k}/{b}"), last.get(f"eval/{k}/{b}")) for k in BUCKET_LABELS)
                     + f" | {change} |")
    return lines


def md_tables_to_html(lines: list[str]) -> str:
    """Report tables' Markdown as HTML (headings, paragraphs, pipe tables), for eval.html and compare.html."""
    out, rows = [], []

    def flush():
        if rows:
            head, *body = rows
            out.append("<table border=1 cellpadding=4><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                       + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                                           for r in body) + "</table>")
            rows.clear()

    for line in lines:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-") for c in cells):
                rows.append(cells)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "".join(out)
