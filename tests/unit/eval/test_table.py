"""Plain-text metrics table."""

import numpy as np

from raytrain.eval.metrics.table import format_table, format_value


def test_values_are_formatted_to_four_significant_digits():
    assert format_value(None) == "-"
    assert format_value(100) == "100"
    assert format_value(np.int64(7)) == "7"
    assert format_value(22.3149) == "22.31"
    assert format_value(658.666) == "658.7"
    assert format_value(0.0211234) == "0.02112"
    assert format_value(np.float32(0.5)) == "0.5"
    assert format_value(123456.0) == "1.235e+05"
    assert format_value(float("nan")) == "nan"


def test_exact_table():
    cols = {
        "trained": {"n": 100, "mean_distance": 22.3149, "success_rate": 0.90114},
        "centre_baseline": {"n": 100, "mean_distance": 141.42, "success_rate": None},
    }
    assert format_table(cols) == (
        "metric         trained  centre_baseline\n"
        "-------------  -------  ---------------\n"
        "n                  100              100\n"
        "mean_distance    22.31            141.4\n"
        "success_rate    0.9011                -"
    )


def test_keys_select_and_order_rows_and_missing_values_show_dash():
    cols = {"a": {"x": 1, "y": 2.0}, "b": {"y": 3.0, "z": 0.5}}
    out = format_table(cols, keys=["z", "x"])
    lines = out.splitlines()
    assert [ln.split()[0] for ln in lines[2:]] == ["z", "x"]
    assert lines[2].split() == ["z", "-", "0.5"]
    assert lines[3].split() == ["x", "1", "-"]
    # default rows: union in order of first appearance
    assert [ln.split()[0] for ln in format_table(cols).splitlines()[2:]] == ["x", "y", "z"]


def test_columns_are_aligned():
    cols = {"trained": {"a": 1.23456789, "long_metric_name": 1e-7}, "u": {"a": 12345, "long_metric_name": None}}
    lines = format_table(cols).splitlines()
    assert len({len(ln) for ln in lines}) == 1  # values right-aligned to a common edge
    starts = {ln.index(ln.split()[1]) + len(ln.split()[1]) for ln in lines[2:]}
    assert len(starts) == 1  # second column ends at the same offset on every row


def test_empty_table():
    assert format_table({}) == "metric\n------"
