"""Held-out results by difficulty bucket: thresholds (fixed or terciles), per-bucket means that add back up
to the overall ones (worked numbers and a float64 loop), and bad bucket settings refused in the config."""

import pytest
import torch

from rntp.config import ConfigError, load_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("overrides, message", [
    (["eval.easy_below=3.0", "eval.hard_above=1.0"], "eval.easy_below=3.0 is above eval.hard_above=1.0"),
    (["eval.buckets=terciles", "eval.num_positions=2"], "eval.buckets=terciles needs eval.num_positions >= 3"),
    (["eval.bucket_by=perplexity"], "eval.bucket_by: Input should be 'entropy' or 'logprob'"),
    (["eval.buckets=quartiles"], "eval.buckets: Input should be 'fixed' or 'terciles'"),
])
def test_bad_bucket_settings_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_config(None, overrides)
    assert len(str(e.value).splitlines()) == 2  # the heading and one line that says why


def test_equal_thresholds_are_allowed_and_leave_no_medium_bucket():
    cfg = load_config(None, ["eval.easy_below=2.0", "eval.hard_above=2.0"])
    assert (cfg.eval.easy_below, cfg.eval.hard_above) == (2.0, 2.0)


# ---- thresholds and buckets --------------------------------------------------------------------------

from rntp.experiments.evaluate import (BUCKETED, BUCKETS, assign_buckets, bucket_means,  # noqa: E402
                                      bucket_thresholds, held_out_report)


def test_fixed_thresholds_and_terciles_worked_numbers():
    d = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 5.0])
    fixed = bucket_thresholds(d, "fixed", 1.0, 3.0)
    assert fixed == (1.0, 3.0)
    assert assign_buckets(d, fixed) == ["easy"] * 5 + ["hard"]  # fixed thresholds: a nearly empty bucket
    # terciles by linear interpolation: 1/3 of the way is index 5/3 -> 0.2 + 2/3 * 0.1, 2/3 -> 0.4 + 1/3 * 0.1
    lo, hi = bucket_thresholds(d, "terciles", 1.0, 3.0)
    assert (lo, hi) == pytest.approx((0.2 + 0.2 / 3, 0.4 + 0.1 / 3), abs=1e-6)
    assert assign_buckets(d, (lo, hi)) == ["easy", "easy", "medium", "medium", "hard", "hard"]
    # a value on a threshold is medium (easy is strictly below, hard strictly above)
    assert assign_buckets(torch.tensor([1.0, 3.0]), (1.0, 3.0)) == ["medium", "medium"]


def test_bucket_means_worked_numbers():
    per = {name: torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0], dtype=torch.float64) for name in BUCKETED}
    buckets = ["easy", "medium", "hard", "easy", "hard", "medium"]
    m = bucket_means(per, buckets)
    assert [m[f"positions/{b}"] for b in BUCKETS] == [2, 2, 2]
    assert [m[f"info_gain/{b}"] for b in BUCKETS] == [-2.5, -4.0, -4.0]
    # weighted by their positions, the buckets give the overall mean back: (2 x -2.5 + 2 x -4 + 2 x -4) / 6
    assert sum(m[f"positions/{b}"] * m[f"info_gain/{b}"] for b in BUCKETS) / 6 == -3.5
    empty = bucket_means(per, ["easy"] * 6)
    assert empty["positions/hard"] == 0 and empty["acc_think/hard"] is None and empty["acc_think/easy"] == -3.5


def test_bucket_means_add_up_to_the_overall_mean_against_a_float64_loop():
    gen = torch.Generator().manual_seed(3)
    n = 101
    per = {name: torch.randn(n, generator=gen, dtype=torch.float64) * 3 for name in BUCKETED}
    buckets = [BUCKETS[int(i)] for i in torch.randint(0, 3, (n,), generator=gen)]
    m = bucket_means(per, buckets)
    for name in BUCKETED:
        values = per[name].tolist()
        sums, counts = {}, {}
        for value, bucket in zip(values, buckets):  # a plain loop over positions
            sums[bucket] = sums.get(bucket, 0.0) + value
            counts[bucket] = counts.get(bucket, 0) + 1
        for b in BUCKETS:
            assert m[f"positions/{b}"] == counts[b]
            assert m[f"{name}/{b}"] == pytest.approx(sums[b] / counts[b], abs=1e-12)
        overall = sum(values) / n
        assert sum(m[f"positions/{b}"] * m[f"{name}/{b}"] for b in BUCKETS) / n == pytest.approx(overall, abs=1e-12)


def test_the_closing_table_has_a_row_per_bucket_from_first_to_last():
    def row(step, gains, nll):
        r = {"step": step, "eval/info_gain": sum(g * n for g, n in zip(gains, (5, 19, 40))) / 64,
             "eval/bucket_easy_below": 1.0, "eval/bucket_hard_above": 3.0}
        for b, g, n in zip(BUCKETS, gains, (5, 19, 40)):
            r.update({f"eval/positions/{b}": n, f"eval/info_gain/{b}": g, f"eval/nll_no_think/{b}": nll})
        return r

    report = held_out_report([row(0, (-1.85, -1.56, -1.53), 3.0), row(40, (-1.13, -0.87, -0.86), 2.9)])
    closing = report.split("\n\n## ")[0]  # what the run prints when it ends
    assert "next-token entropy at each position; easy below 1.00, hard above 3.00 nats" in closing
    hard = next(line for line in closing.splitlines() if line.startswith("| hard |"))
    cells = [c.strip() for c in hard.strip("|").split("|")]
    assert cells[:3] == ["hard", "40", "-1.530 → -0.860"]
    assert cells[5] == "3.000 → 2.900" and cells[-1] == "+0.670"  # no-think NLL; the change in information gain
    assert "-log p of the true next token" in held_out_report([row(0, (0, 0, 0), 3.0)], bucket_by="logprob")
