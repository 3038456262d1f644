"""The generated reasoning task: answers are right (recomputed from the question text by an
independent parser), the working reproduces them, train and held-out splits share formats
but never instances, and the files tools/make_tasks.py writes are deterministic and loadable."""

from __future__ import annotations

import functools
import json
import random
import re
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

from megatron_rlp.data.corpus import load_corpus
from megatron_rlp.eval.tasks import KINDS, corpus_document, is_held_out, items
from megatron_rlp.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[2]
FORMATS = {  # the question templates, one per kind (shared by both splits)
    "add": re.compile(r"What is (\d+) \+ (\d+)\?"),
    "chain": re.compile(r"Start with (\d+)((?:, (?:add|subtract|multiply by) \d+)+)\. "
                        r"What is the result\?"),
    "lookup": re.compile(r"Prices: ([a-z]+ \d+(?:, [a-z]+ \d+)+)\. What do (\d+) ([a-z]+) "
                         r"and (\d+) ([a-z]+) cost\?"),
}


def solve(kind: str, question: str) -> int:
    """The answer, computed from the question text alone."""
    m = FORMATS[kind].fullmatch(question)
    assert m, (kind, question)
    if kind == "add":
        return int(m[1]) + int(m[2])
    if kind == "chain":
        value = int(m[1])
        for op, n in re.findall(r"(add|subtract|multiply by) (\d+)", m[2]):
            value = {"add": value + int(n), "subtract": value - int(n),
                     "multiply by": value * int(n)}[op]
        return value
    prices = {name: int(p) for name, p in (e.split() for e in m[1].split(", "))}
    return int(m[2]) * prices[m[3][:-1]] + int(m[4]) * prices[m[5][:-1]]


def work_result(kind: str, work: str) -> int:
    """What the working says the answer is."""
    if kind == "add":  # columns right to left: the last sum whole, the others' last digit
        sums = [int(s.split("=")[1]) for s in work.split()]
        return int(str(sums[-1]) + "".join(str(s % 10) for s in reversed(sums[:-1])))
    return int(work.split()[-1].split("=")[1])


@pytest.mark.parametrize("held_out", [False, True])
def test_answers_are_right_and_the_work_gives_them(held_out):
    for item in islice(items(7, held_out=held_out), 600):
        assert int(item.answer) == solve(item.kind, item.question), item
        assert work_result(item.kind, item.work) == int(item.answer), item
        assert item.prompt().endswith("Answer: ") and item.text(True).count("<think>") == 1


def test_splits_share_formats_not_instances():
    train = list(islice(items(1, held_out=False), 6000))
    held = list(islice(items(2, held_out=True), 600))
    assert not {i.key for i in train} & {i.key for i in held}
    assert not {i.question for i in train} & {i.question for i in held}
    for split in (train, held):
        assert {i.kind for i in split} == set(KINDS)
        assert all(FORMATS[i.kind].fullmatch(i.question) for i in split)
    rng = random.Random(0)
    keys = [f"add:{rng.randint(100, 999)}+{rng.randint(100, 999)}" for _ in range(5000)]
    assert 0.08 < sum(is_held_out(k, 10.0) for k in keys) / len(keys) < 0.12


def test_held_out_split_does_not_depend_on_the_seed():
    a = {i.key for i in islice(items(1, held_out=True, kinds=("add",), digits=2), 200)}
    b = {i.key for i in islice(items(99, held_out=True, kinds=("add",), digits=2), 200)}
    # 2-digit additions: 8100 instances, ~810 held out; two seeds draw from the same set
    assert all(is_held_out(k, 10.0) for k in a | b)
    assert not a & {i.key for i in islice(items(5, held_out=False, kinds=("add",), digits=2),
                                          3000)}


def test_answer_offsets_point_at_the_first_answer_character():
    stream = items(4, held_out=False)
    doc = corpus_document(stream, random.Random(0), 8, think_rate=0.5)
    answers = [line for line in doc["text"].split("\n") if line.startswith("Answer: ")]
    for offset, line in zip(doc["answer_offsets"], answers, strict=True):
        answer = re.search(r"(\d+)$", line)[1]
        assert doc["text"][offset:offset + len(answer)] == answer
        assert doc["text"][offset - 1] in " >"  # after "Answer: " or a thought's "</think>"


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown task kind"):
        next(items(0, held_out=False, kinds=("nope",)))
    with pytest.raises(ValueError, match="held_out_percent"):
        next(items(0, held_out=False, held_out_percent=0))


def test_make_tasks_writes_deterministic_loadable_files(tmp_path):
    def run(out):
        subprocess.run([sys.executable, "tools/make_tasks.py", "--out-dir", str(out),
                        "--num-docs", "30", "--num-heldout", "12"], cwd=ROOT, check=True,
                       capture_output=True, timeout=60)
        return {p.name: p.read_bytes() for p in out.glob("*.jsonl")}

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first == second and set(first) == {"train.jsonl", "heldout.jsonl", *(
        f"heldout_{k}.jsonl" for k in KINDS)}
    corpus = load_corpus(tmp_path / "a" / "train.jsonl", ByteTokenizer())
    assert len(corpus) == 30
    held = [json.loads(line) for line in first["heldout.jsonl"].decode().splitlines()]
    assert len(held) == 36 and [h["kind"] for h in held[:3]] == list(KINDS)
    train_text = first["train.jsonl"].decode()
    assert not any(h["question"] in train_text for h in held)
    assert (tmp_path / "a" / "lm_eval" / "rlp_heldout_gen.yaml").is_file()


def test_drawn_keys_follow_the_counted_rules():
    """task_space counts instances by the generators' rules: every drawn key is among them."""
    from megatron_rlp.eval.task_space import _chain_ops, instance_count, split_keys
    from megatron_rlp.eval.tasks import make_item

    rng = random.Random(5)
    listed = set(split_keys("add", 1))
    assert len(listed) == instance_count("add", 1) == 81
    assert all(make_item(rng, "add", 1).key in listed for _ in range(500))
    for _ in range(2000):  # chain: start 2..20, 2-3 operations each allowed by _chain_ops
        start, *ops = make_item(rng, "chain").key.removeprefix("chain:").split(",")
        value = int(start)
        assert 2 <= value <= 20 and len(ops) in (2, 3)
        for op in ops:
            value = {part: result for part, _, result in _chain_ops(value)}[op]

    @functools.cache
    def sequences(value: int, depth: int) -> int:  # chains of 2-3 operations from here
        here = depth in (2, 3)
        return here + (sum(sequences(r, depth + 1) for _, _, r in _chain_ops(value))
                       if depth < 3 else 0)

    # The count over values (instance_count) equals a walk of the operation tree.
    assert sum(sequences(s, 0) for s in range(2, 21)) == instance_count("chain") == 6_070_960


def test_exhausted_split_ends_the_stream_and_make_tasks_refuses(tmp_path):
    from megatron_rlp.eval.task_space import split_shortfall, split_size

    held, train = split_size("add", 1, 10.0, True), split_size("add", 1, 10.0, False)
    assert held + train == 81 and held == sum(is_held_out(f"add:{a}+{b}", 10.0)
                                              for a in range(1, 10) for b in range(1, 10))
    drawn = list(items(3, held_out=True, kinds=("add",), digits=1))  # ends, does not hang
    assert len(drawn) == len({i.key for i in drawn}) == held
    assert split_shortfall("add", held, held_out=True, held_out_percent=10.0, digits=1) is None
    assert split_shortfall("add", held + 1, held_out=True, held_out_percent=10.0,
                           digits=1) == held
    assert split_shortfall("lookup", 10**9, held_out=True, held_out_percent=10.0) is None

    def make(*args):
        return subprocess.run([sys.executable, "tools/make_tasks.py", "--out-dir",
                               str(tmp_path), "--kinds", "add", "--digits", "1", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)

    for args, line in [
        (("--num-docs", "1", "--num-heldout", str(held + 1)),
         f"error: --num-heldout={held + 1} (allowed: at most {held}: the held-out split has "
         f"{held} add instances with --digits 1 and --held-out-percent 10.0)"),
        (("--num-docs", str(train // 6 + 1), "--num-heldout", "1"),
         f"error: --num-docs={train // 6 + 1} (allowed: at most {train // 6} with "
         f"--items-per-doc 6: the training split has {train} add instances with --digits 1 "
         "and --held-out-percent 10.0)"),
    ]:
        proc = make(*args)
        assert proc.returncode == 2 and proc.stderr.splitlines() == [line], proc.stderr
    proc = make("--num-docs", str(train // 6), "--num-heldout", str(held))
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "heldout.jsonl").read_text().splitlines()) == held
