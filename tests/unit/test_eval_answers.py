"""Answer extraction and matching (GSM8K / MATH conventions), pass@k against a brute-force
reference, benchmark file and option checks."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from megatron_rlp.eval.answers import extract_answer, is_match, parse_number, pass_at_k
from megatron_rlp.eval.benchmark import BenchmarkOptions, read_benchmark
from megatron_rlp.eval.decode import truncate_at_stop


@pytest.mark.parametrize("text, mode, want", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "first", "72"),  # GSM8K gold
    ("#### 1,234", "first", "1,234"),
    ("so the area is \\boxed{\\frac{1}{2}} square units", "first", "\\frac{1}{2}"),
    ("\\boxed{x^{2}+1} and later \\boxed{5}", "first", "5"),  # the last box
    ("\\boxed{\\{1, 2\\}}", "first", "\\{1, 2\\}"),
    ("I think 3 + 4 = 7. The answer is 7.", "last", "7"),
    ("Step 1: 3 apples. The final answer is $12.50.", "first", "$12.50"),
    ("Answer: -17 because 3", "last", "-17"),  # the phrase wins over `last`
    (" 7703\nQuestion: What", "first", "7703"),
    ("12 then 15", "first", "12"),
    ("12 then 15", "last", "15"),
    ("  no number here ", "first", "no number here"),
])
def test_extract_answer(text, mode, want):
    assert extract_answer(text, mode) == want


@pytest.mark.parametrize("pred, gold, kind, want", [
    ("1,234", "1234", "numeric", True),
    ("$12.50", "12.5", "numeric", True),
    ("\\frac{1}{2}", "0.5", "numeric", True),
    ("1/2", "0.5", "numeric", True),
    ("50%", "50", "numeric", True),
    ("7.", "7", "numeric", True),
    ("1e3", "1000", "numeric", True),
    ("7703", "7704", "numeric", False),
    ("0.3333", "1/3", "numeric", False),  # beyond 1e-6 relative
    ("0.33333333", "1/3", "numeric", True),  # within it
    ("x+1", "X + 1", "numeric", True),  # not numbers: compared as exact strings
    ("\\text{Paris}", "paris.", "exact", True),
    ("1,234", "1234", "exact", False),
])
def test_is_match(pred, gold, kind, want):
    assert is_match(pred, gold, kind) is want


def test_parse_number_rejects_non_numbers():
    assert parse_number("3/0") is None and parse_number("x") is None
    assert parse_number("-3/4") == Fraction(-3, 4)


def brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Exactly: the share of k-subsets of n samples (c correct) holding a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_subset_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            want = brute_pass_at_k(n, c, k)
            assert pass_at_k(n, c, k) == pytest.approx(float(want), abs=1e-12), (n, c, k)
            assert float(want) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_large_n_is_stable_and_checked():
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    assert pass_at_k(200, 10, 100) == pytest.approx(1 - math.comb(190, 100) / math.comb(200, 100))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_truncate_at_stop():
    assert truncate_at_stop("12 apples\nQuestion: x", ["\n", "Question:"]) == "12 apples"
    assert truncate_at_stop("abc", ["z"]) == "abc" and truncate_at_stop("abc", []) == "abc"
    assert truncate_at_stop("a.b;c", [";", "."]) == "a"  # the earliest stop, any order


def test_read_benchmark(tmp_path):
    good = tmp_path / "b.jsonl"
    good.write_text('{"question": "q1", "answer": "#### 3"}\n\n{"question": "q2", "answer": 4}\n')
    assert [r["answer"] for r in read_benchmark(good)] == ["#### 3", "4"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q1", "answer": "1"}\n{"prompt": "q2"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_benchmark(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no benchmark item"):
        read_benchmark(empty)


@pytest.mark.parametrize("kwargs, match", [
    (dict(samples=0), "samples"),
    (dict(samples=4), "temperature"),
    (dict(match="fuzzy"), "match"),
    (dict(prompt_template="Q:"), "question"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchmarkOptions(**kwargs).validate()
    BenchmarkOptions(samples=4, think=True).validate()  # n thoughts, greedy answers: fine
