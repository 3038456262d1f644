"""eval/intervals.py: Student-t 95% intervals over seeds and paired differences, checked
against values worked by hand."""

from __future__ import annotations

import math

import pytest

from megatron_rlp.eval.intervals import (
    binomial_se,
    items_for_se,
    mean_interval,
    paired_difference,
    t_quantile_975,
)


def test_t_quantiles():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303
    assert t_quantile_975(30) == 2.042 and t_quantile_975(1000) == 1.96
    with pytest.raises(ValueError, match="df=0"):
        t_quantile_975(0)


def test_mean_interval_by_hand():
    iv = mean_interval([0.5, 0.7, 0.6])
    sd = math.sqrt(((0.5 - 0.6) ** 2 + (0.7 - 0.6) ** 2) / 2)  # 0.1
    assert iv["mean"] == pytest.approx(0.6) and iv["sd"] == pytest.approx(sd)
    assert iv["half"] == pytest.approx(4.303 * sd / math.sqrt(3))
    assert iv["low"] == pytest.approx(0.6 - iv["half"]) and iv["n"] == 3
    one = mean_interval([0.4])
    assert one["mean"] == 0.4 and one["half"] is None and one["low"] is None
    with pytest.raises(ValueError):
        mean_interval([])


def test_paired_difference_verdicts():
    win = paired_difference([0.8, 0.82, 0.81], [0.7, 0.71, 0.69])
    assert win["mean"] == pytest.approx(0.11) and win["verdict"] == "a" and win["low"] > 0
    assert paired_difference([0.1, 0.2, 0.1], [0.3, 0.4, 0.35])["verdict"] == "b"
    assert paired_difference([0.5, 0.7, 0.6], [0.6, 0.6, 0.6])["verdict"] == "tie"
    assert paired_difference([0.5], [0.4])["verdict"] == "n/a"
    with pytest.raises(ValueError, match="length"):
        paired_difference([1.0, 2.0], [1.0])


def test_items_for_a_standard_error():
    assert items_for_se(0.02) == 625  # the worst case p = 0.5
    assert binomial_se(0.5, 625) == pytest.approx(0.02)
    assert binomial_se(0.9, 625) < 0.02
