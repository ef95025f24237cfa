"""The before/after table and held-out curve a run ends with (`rntp.experiments.evaluate.held_out_report`)."""

import pytest

from rntp.experiments.evaluate import held_out_report

pytestmark = pytest.mark.unit


def row(step, gain, empty, nll, length, **extra):
    return {"step": step, "eval/info_gain": gain, "eval/info_gain_empty": empty, "eval/info_gain_content": gain - empty,
            "eval/nll_no_think": nll, "eval/thought_len_mean": length, "eval/positions/easy": 10,
            "eval/positions/medium": 40, "eval/positions/hard": 14, **extra}


def test_the_table_compares_the_first_evaluation_with_the_last_and_lists_every_one():
    rows = [row(0, -1.96, -0.94, 3.048, 13.7), {"step": 1, "info_gain": -1.2},  # a step without evaluation
            row(20, -0.73, -0.48, 3.101, 5.0), row(40, -0.41, -0.29, 2.990, 2.3)]
    report = held_out_report(rows)
    lines = report.splitlines()
    assert lines[0] == "Held-out text, the same 64 positions for every model:"
    assert "| | base model (step 0) | step 40 | change |" in lines
    gain = next(line for line in lines if line.startswith("| information gain"))
    assert gain.split(" | ")[1:] == ["-1.960", "-0.410", "+1.550 |"]  # -0.41 - (-1.96), not the step-20 value
    nll = next(line for line in lines if line.startswith("| no-think NLL"))
    assert nll.split(" | ")[1:] == ["3.048", "2.990", "-0.058 (-1.9%) |"]
    content = next(line for line in lines if line.startswith("| ... that the thoughts"))
    assert content.split(" | ")[1:] == ["-1.020", "-0.120", "+0.900 |"]
    curve = report.split("## Every evaluation")[1]
    assert [line.split(" | ")[0] for line in curve.splitlines() if line.startswith("| ") and line[2].isdigit()] \
        == ["| 0", "| 20", "| 40"]


def test_a_run_that_never_evaluated_has_no_report():
    assert held_out_report([{"step": 1, "info_gain": -1.0}]) is None
