"""`rntp compare`: bootstrap intervals against a float64 loop and worked numbers, paired differences,
designs grouped across seeds, the report from synthetic run folders (old and new formats)."""

import json
import math

import numpy as np
import pytest
import yaml

from rntp.experiments.compare import (bootstrap_difference, bootstrap_mean, compare, design_name, group_designs,
                                      load_run, resample_counts)
from rntp.config import load_config

pytestmark = pytest.mark.unit


def percentile(sorted_values, q):
    """Linear interpolation between order statistics (numpy's default), written out."""
    h = (len(sorted_values) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (h - lo) * (sorted_values[hi] - sorted_values[lo])


def loop_bootstrap(values, resamples, seed):
    """The documented draws, then each resample's mean by explicit indexing and a Python loop."""
    values = np.asarray(values, dtype=np.float64)
    s, p = values.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(s, size=(resamples, s))
    positions = rng.integers(p, size=(resamples, p))
    stats = []
    for b in range(resamples):
        total = 0.0
        for i in seeds[b]:
            for j in positions[b]:
                total += float(values[i, j])
        stats.append(total / (s * p))
    stats.sort()
    return percentile(stats, 0.025), percentile(stats, 0.975)


def test_resample_counts_count_each_draw():
    draws = np.array([[0, 0, 2], [1, 2, 1]])
    assert resample_counts(draws, 3).tolist() == [[2, 0, 1], [0, 2, 1]]


@pytest.mark.parametrize("shape", [(3, 17), (1, 9), (4, 1)])
def test_bootstrap_mean_equals_a_float64_loop_with_the_same_draws(shape):
    values = np.random.default_rng(7).normal(size=shape) * 3 + 1
    iv = bootstrap_mean(values, resamples=300, seed=11)
    lo, hi = loop_bootstrap(values, 300, 11)
    assert iv.mean == pytest.approx(float(values.mean()), abs=1e-15)
    assert iv.lo == pytest.approx(lo, abs=1e-12) and iv.hi == pytest.approx(hi, abs=1e-12)
    assert (iv.seeds, iv.positions) == shape


def test_bootstrap_worked_examples():
    # one seed, two positions [0, 1]: resampled means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4
    iv = bootstrap_mean([[0.0, 1.0]], resamples=4000)
    assert (iv.mean, iv.lo, iv.hi) == (0.5, 0.0, 1.0)
    # two seeds, one position: the same over seeds
    iv = bootstrap_mean([[1.0], [3.0]], resamples=4000)
    assert (iv.mean, iv.lo, iv.hi) == (2.0, 1.0, 3.0)
    # one seed, one number: no interval
    iv = bootstrap_mean([[2.5]])
    assert (iv.mean, iv.lo, iv.hi) == (2.5, None, None)


def test_two_way_bootstrap_spread_matches_its_closed_form():
    """v[s, p] = a_s + b_p: a resampled grand mean is mean(a*) + mean(b*), whose variance is
    var(a)/S + var(b)/P (population variances); the 95% interval is close to +-1.96 of its root."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=40) * 0.5, rng.normal(size=300)
    values = a[:, None] + b[None, :]
    sd = math.sqrt(a.var() / 40 + b.var() / 300)
    iv = bootstrap_mean(values, resamples=20000, seed=1)
    assert (iv.hi - iv.lo) / (2 * 1.959964 * sd) == pytest.approx(1.0, abs=0.03)
    assert (iv.lo + iv.hi) / 2 == pytest.approx(values.mean(), abs=0.1 * sd)


def test_paired_difference_is_exact_and_narrower_on_correlated_positions():
    """Two designs on the same 64 positions whose difficulty varies far more than the designs differ:
    pairing cancels the shared difficulty."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(size=64) * 2.0
    control = difficulty + rng.normal(size=(3, 64)) * 0.1
    design = difficulty + 0.3 + rng.normal(size=(3, 64)) * 0.1
    paired = bootstrap_difference(design, control, paired=True, resamples=4000)
    unpaired = bootstrap_difference(design, control, paired=False, resamples=4000)
    exact = float(design.mean() - control.mean())
    assert paired.mean == unpaired.mean == exact
    assert paired.paired and not unpaired.paired
    assert paired.lo < exact < paired.hi and paired.lo > 0  # resolved when paired...
    assert unpaired.lo < 0 < unpaired.hi  # ...not when the shared difficulty is left in
    assert (paired.hi - paired.lo) < 0.2 * (unpaired.hi - unpaired.lo)


def test_paired_difference_equals_a_float64_loop_with_the_same_draws():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(2, 11)), rng.normal(size=(3, 11))
    iv = bootstrap_difference(a, b, paired=True, resamples=200, seed=4)
    draws = np.random.default_rng(4)
    sa, sb = draws.integers(2, size=(200, 2)), draws.integers(3, size=(200, 3))
    pos = draws.integers(11, size=(200, 11))
    stats = sorted(float(np.mean([a[i, j] for i in sa[k] for j in pos[k]]) -
                         np.mean([b[i, j] for i in sb[k] for j in pos[k]])) for k in range(200))
    assert iv.lo == pytest.approx(percentile(stats, 0.025), abs=1e-12)
    assert iv.hi == pytest.approx(percentile(stats, 0.975), abs=1e-12)


@pytest.mark.parametrize("name, design", [("control__seed-2", "control"), ("name-info_gain__seed-0", "name-info_gain"),
                                          ("kl-seed3", "kl"), ("seed-1", "run"), ("plain", "plain")])
def test_design_names_drop_a_sweeps_seed_suffix(name, design):
    assert design_name(name) == design


# ---- synthetic run folders -----------------------------------------------------------------------------

KEYS = [f"k{i}" for i in range(20)]


def write_run(root, name, overrides, gains, steps=(0, 10), per_position=True, eval_json=False, buckets=None):
    """A run folder as training leaves it: config.yaml, metrics.jsonl with eval/* rows and (new runs)
    eval_positions.jsonl; gains[step] = the info gain at each of the 20 positions; `buckets`: each
    position's difficulty bucket, saved with the values."""
    run = root / name
    run.mkdir(parents=True)
    cfg = load_config(None, [f"run_dir={run}", *overrides])
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    rows, lines = [], []
    for step in steps:
        values = {"info_gain": list(gains[step]), "nll_no_think": [3.0] * 20, "thought_len_mean": [5.0] * 20}
        rows.append({"step": step, "reward/mean": 0.1, **{f"eval/{k}": float(np.mean(v)) for k, v in values.items()}})
        lines.append({"step": step, "keys": KEYS, "values": values, **({"buckets": buckets} if buckets else {})})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if per_position:
        (run / "eval_positions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if eval_json:
        (run / "eval").mkdir()
        (run / "eval" / "eval.json").write_text(json.dumps({"schema": "rntp.eval/1", "results": [
            {"label": f"step_{s}", "step": s, "metrics": {"info_gain": float(np.mean(gains[s]))},
             "per_position": {"keys": KEYS, "values": {"info_gain": list(gains[s])}}} for s in steps]}))
    return run


@pytest.fixture
def sweep(tmp_path):
    """Two designs (the pg_coef=0 control and info_gain) x 3 seeds on the same 20 positions."""
    rng = np.random.default_rng(1)
    difficulty = rng.normal(size=20)
    runs, gains = [], {}
    designs = (("control", ["grpo.pg_coef=0"], 0.0), ("info_gain", ["reward.name=info_gain"], 0.2))
    for design, overrides, shift in designs:
        for seed in range(3):
            g = {0: difficulty + rng.normal(size=20) * 0.05, 10: difficulty + shift + rng.normal(size=20) * 0.05}
            gains[(design, seed)] = g
            runs.append(write_run(tmp_path / "sweep", f"{design}__seed-{seed}",
                                  [*overrides, f"train.seed={seed}", f"data.seed={seed}",
                                   f"log.wandb_group=g{seed}"], g))
    return runs, gains


def test_designs_group_runs_across_seeds_by_config(sweep):
    runs, _ = sweep
    designs = group_designs([load_run(r) for r in runs])
    assert [(d.name, len(d.runs)) for d in designs] == [("control", 3), ("info_gain", 3)]
    assert designs[0].differs == {"grpo.pg_coef": 0.0, "reward.name": "target_logprob"}
    assert designs[1].differs == {"grpo.pg_coef": 1.0, "reward.name": "info_gain"}


def test_report_has_design_intervals_and_paired_differences_from_the_control(sweep, tmp_path):
    runs, gains = sweep
    out = tmp_path / "cmp"
    compare([str(r) for r in runs], out, resamples=500)  # the control: the one design with pg_coef=0
    rows = {(r["design"], r["metric"]): r for r in __import__("csv").DictReader(open(out / "designs.csv"))}
    final = lambda d: np.array([gains[(d, s)][10] for s in range(3)])  # noqa: E731
    expected = bootstrap_mean(final("info_gain"), resamples=500)
    got = rows[("info_gain", "info_gain")]
    assert float(got["mean"]) == pytest.approx(expected.mean, abs=1e-12)
    assert (float(got["lo"]), float(got["hi"])) == pytest.approx((expected.lo, expected.hi), abs=1e-12)
    assert got["positions"] == "20" and got["seeds"] == "3" and got["control"] == "control"
    diff = bootstrap_difference(final("info_gain"), final("control"), paired=True, resamples=500)
    assert float(got["difference"]) == pytest.approx(float(final("info_gain").mean() - final("control").mean()))
    assert (float(got["difference_lo"]), float(got["difference_hi"])) == pytest.approx((diff.lo, diff.hi), abs=1e-12)
    assert got["paired"] == "True" and float(got["difference_lo"]) > 0
    md = (out / "compare.md").read_text()
    assert "## Difference from the control `control`" in md and "| info_gain | yes (20 positions) |" in md
    assert md.count("\n| control__seed-") == 3  # the per-run table as before
    assert (out / "heldout_info_gain.png").exists() and (out / "heldout_info_gain_minus_control.png").exists()
    assert "<h2>Designs" in (out / "report.html").read_text()


def test_old_runs_without_per_position_values_bootstrap_over_seeds(tmp_path):
    gains = [{0: np.full(20, g), 10: np.full(20, g + 1)} for g in (0.1, 0.3, 0.2)]
    runs = [write_run(tmp_path, f"old__seed-{s}", [f"train.seed={s}"], gains[s], per_position=False)
            for s in range(3)]
    out = tmp_path / "cmp"
    compare([str(r) for r in runs], out, resamples=500)
    row = next(r for r in __import__("csv").DictReader(open(out / "designs.csv")) if r["metric"] == "info_gain")
    expected = bootstrap_mean([[1.1], [1.3], [1.2]], resamples=500)
    assert row["positions"] == "1" and float(row["mean"]) == pytest.approx(1.2)
    assert (float(row["lo"]), float(row["hi"])) == pytest.approx((expected.lo, expected.hi))
    assert "means only" in (out / "compare.md").read_text()


def test_per_position_values_from_eval_json_are_read(tmp_path):
    gains = {0: np.linspace(-1, 0, 20), 10: np.linspace(0, 1, 20)}
    run = write_run(tmp_path, "r", [], gains, per_position=False, eval_json=True)
    evals = load_run(run)["evals"]
    assert [e.step for e in evals] == [0, 10] and evals[-1].keys == KEYS
    assert evals[-1].values["info_gain"] == pytest.approx(list(gains[10]))


def test_an_unknown_control_is_a_clear_error(sweep, tmp_path):
    runs, _ = sweep
    with pytest.raises(ValueError, match="--control 'nope' is not one of the designs: control, info_gain"):
        compare([str(r) for r in runs], tmp_path / "cmp", control="nope")


def test_compare_per_bucket_gives_the_same_paired_intervals_over_the_buckets_positions(tmp_path):
    """Two designs x 3 seeds on 20 positions cut 6 / 8 / 6 into buckets: each bucket's mean, interval and
    paired difference from the control are the overall computations on that bucket's columns, and the
    bucket means weighted by their positions add back up to the overall mean."""
    rng = np.random.default_rng(2)
    buckets = ["easy"] * 6 + ["medium"] * 8 + ["hard"] * 6
    order = rng.permutation(20)
    buckets = [buckets[i] for i in order]
    help_hard = np.array([0.4 if b == "hard" else 0.0 for b in buckets])  # the design helps hard positions only
    difficulty = rng.normal(size=20)
    gains, runs = {}, []
    for design, overrides, shift in (("control", ["grpo.pg_coef=0"], 0.0), ("design", ["reward.name=info_gain"], 1.0)):
        for seed in range(3):
            g = {0: difficulty, 10: difficulty + shift * help_hard + rng.normal(size=20) * 0.05}
            gains[(design, seed)] = g[10]
            runs.append(write_run(tmp_path, f"{design}__seed-{seed}", [*overrides, f"train.seed={seed}"], g,
                                  buckets=buckets))
    out = tmp_path / "cmp"
    compare([str(r) for r in runs], out, resamples=400)
    rows = {(r["design"], r["metric"], r["bucket"]): r for r in __import__("csv").DictReader(open(out / "designs.csv"))}
    final = lambda d, cols: np.array([gains[(d, s)][cols] for s in range(3)])  # noqa: E731
    total = 0.0
    for b in ("easy", "medium", "hard"):
        cols = [i for i in range(20) if buckets[i] == b]
        row = rows[("design", "info_gain", b)]
        expected = bootstrap_mean(final("design", cols), resamples=400)
        assert row["positions"] == str(len(cols)) and float(row["mean"]) == pytest.approx(expected.mean, abs=1e-12)
        assert (float(row["lo"]), float(row["hi"])) == pytest.approx((expected.lo, expected.hi), abs=1e-12)
        diff = bootstrap_difference(final("design", cols), final("control", cols), paired=True, resamples=400)
        assert (float(row["difference"]), float(row["difference_lo"]), float(row["difference_hi"])) == \
            pytest.approx((diff.mean, diff.lo, diff.hi), abs=1e-12)
        assert row["paired"] == "True"
        total += len(cols) * float(row["mean"])
    overall = rows[("design", "info_gain", "all")]
    assert total / 20 == pytest.approx(float(overall["mean"]), abs=1e-12)
    # the design's help is resolved on the hard positions and nowhere else
    assert float(rows[("design", "info_gain", "hard")]["difference_lo"]) > 0.3
    assert float(rows[("design", "info_gain", "easy")]["difference_lo"]) < 0 < float(
        rows[("design", "info_gain", "easy")]["difference_hi"])
    md = (out / "compare.md").read_text()
    assert "## By difficulty: difference from the control `control`" in md
    assert "| design | hard | yes (6 positions) | +0.4" in md
