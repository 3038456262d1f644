"""A reasoning task where thinking can pay: items whose answer needs intermediate work,
split into training and held-out instances that share formats, not instances.

Three kinds, each written `Question: ...\\nAnswer: <answer>`:

    add     multi-digit addition with carries:    What is 4738 + 2965?          7703
            the first answer digit depends on every carry, so it is the least predictable
            byte without working (right to left, the order the answer is not written in)
    chain   chained operations on a running value: Start with 7, multiply by 6, add 15,
            subtract 9. What is the result?           48
    lookup  a price table, then a purchase:        Prices: pen 7, cup 12, hat 23. What do
            3 cups and 2 pens cost?                   50

Every item has a canonical `key` (e.g. `add:4738+2965`); a keyed hash puts it in the held-out
split or not (`is_held_out`), so the training corpus never contains a held-out instance,
whatever the seed, while both splits are drawn from the same templates. The position where
thinking matters is the answer's first token: corpus documents record its character offsets
(`answer_offsets`), benchmark items end their prompt right before it.

In the training corpus a share of the items (`think_rate`) carry their working as a
`<think>...</think>` span right before the answer (`Answer: <think>8+5=13 ...</think>7703`),
the format of the shipped corpus (tools/make_corpus.py): the model learns what a useful
thought looks like, and the other items keep it able to answer without one.

The byte-level texts are ASCII, so character offsets are byte-tokenizer token offsets outside
thought spans.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_rlp.eval.task_keys import OBJECTS, is_held_out
from megatron_rlp.eval.task_space import split_shortfall

KINDS = ("add", "chain", "lookup")
THINK_START, THINK_END = "<think>", "</think>"
PROMPT = "Question: {question}\nAnswer: "  # the benchmark prompt; the answer follows directly

_OPS = {"add": ("+", lambda a, b: a + b), "subtract": ("-", lambda a, b: a - b),
        "multiply by": ("*", lambda a, b: a * b)}


@dataclass(frozen=True)
class Item:
    """One task instance.

    Attributes:
        kind: one of KINDS.
        key: canonical identity of the instance (what the held-out split is keyed on).
        question: the question text, without the `Question:` / `Answer:` frame.
        answer: the answer, digits only.
        work: the intermediate steps that make the answer predictable (a thought's text).
    """

    kind: str
    key: str
    question: str
    answer: str
    work: str

    def prompt(self) -> str:
        """The benchmark prompt: `Question: ...\\nAnswer: `, the answer's first token next."""
        return PROMPT.format(question=self.question)

    def text(self, think: bool) -> str:
        """The item as corpus text, with its working as a thought before the answer if
        `think`."""
        thought = f"{THINK_START}{self.work}{THINK_END}" if think else ""
        return f"{self.prompt()}{thought}{self.answer}"


def make_add(rng: random.Random, digits: int) -> Item:
    """a + b with `digits`-digit operands; the work is column by column with carries."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    steps, carry = [], 0
    for da, db in zip(reversed(str(a)), reversed(str(b)), strict=True):
        total = int(da) + int(db) + carry
        steps.append(f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return Item("add", f"add:{a}+{b}", f"What is {a} + {b}?", str(a + b), " ".join(steps))


def make_chain(rng: random.Random, length: int) -> Item:
    """A start value and `length` operations; the work writes every intermediate value."""
    value = rng.randint(2, 20)
    start, ops, steps = value, [], []
    for _ in range(length):
        name = rng.choice(tuple(_OPS))
        symbol, fn = _OPS[name]
        if name == "multiply by":
            operand = rng.randint(2, 9) if value < 100 else 2
        elif name == "subtract" and value > 2:
            operand = rng.randint(1, min(value - 1, 40))
        else:
            name, (symbol, fn) = "add", _OPS["add"]
            operand = rng.randint(2, 40)
        result = fn(value, operand)
        ops.append(f"{name} {operand}")
        steps.append(f"{value}{symbol}{operand}={result}")
        value = result
    question = f"Start with {start}, {', '.join(ops)}. What is the result?"
    key = f"chain:{start}," + ",".join(o.replace(" ", "") for o in ops)
    return Item("chain", key, question, str(value), " ".join(steps))


def make_lookup(rng: random.Random, table_size: int) -> Item:
    """A price table of `table_size` objects, then the cost of two of them in quantities."""
    objects = rng.sample(OBJECTS, table_size)
    prices = [rng.randint(2, 40) for _ in objects]
    i, j = rng.sample(range(table_size), 2)
    qi, qj = rng.randint(2, 9), rng.randint(2, 9)
    table = ", ".join(f"{o[0]} {p}" for o, p in zip(objects, prices, strict=True))
    question = (f"Prices: {table}. What do {qi} {objects[i][1]} and {qj} {objects[j][1]} "
                "cost?")
    a, b = qi * prices[i], qj * prices[j]
    work = f"{qi}*{prices[i]}={a} {qj}*{prices[j]}={b} {a}+{b}={a + b}"
    key = f"lookup:{table};{qi}x{objects[i][0]}+{qj}x{objects[j][0]}"
    return Item("lookup", key, question, str(a + b), work)


def make_item(rng: random.Random, kind: str, digits: int = 3) -> Item:
    """One random item of `kind` (`digits`: operand size of `add`)."""
    if kind == "add":
        return make_add(rng, digits)
    if kind == "chain":
        return make_chain(rng, rng.randint(2, 3))
    if kind == "lookup":
        return make_lookup(rng, rng.randint(3, 4))
    raise ValueError(f"unknown task kind {kind!r} (allowed: {', '.join(KINDS)})")


def items(seed: int, *, held_out: bool, held_out_percent: float = 10.0,
          kinds: tuple[str, ...] = KINDS, digits: int = 3) -> Iterator[Item]:
    """A stream of distinct items of one split, kinds in turn; it ends when the kind whose
    turn it is has no unused instance left in the split (eval/task_space.py sizes a split, so
    callers can refuse such a request up front).

    Args:
        seed: stream seed (the split itself does not depend on it).
        held_out: draw the held-out split (True) or the training split (False).
        held_out_percent: share of all instances that are held out, in (0, 100).

    Raises:
        ValueError: an unknown kind, or a percentage outside (0, 100).
    """
    if not 0 < held_out_percent < 100:
        raise ValueError(f"held_out_percent must be in (0, 100), got {held_out_percent}")
    for kind in kinds:
        make_item(random.Random(0), kind, digits)  # fail early on an unknown kind
    rng, seen, turn, misses = random.Random(seed), set(), 0, 0
    drawn = dict.fromkeys(kinds, 0)
    while True:
        kind = kinds[turn % len(kinds)]
        item = make_item(rng, kind, digits)
        if item.key in seen or is_held_out(item.key, held_out_percent) != held_out:
            misses += 1
            # Many misses in a row: is the split used up? (a costly question, asked rarely)
            if misses % 10_000 == 0 and split_shortfall(
                    kind, drawn[kind] + 1, held_out=held_out,
                    held_out_percent=held_out_percent, digits=digits) is not None:
                return
            continue
        seen.add(item.key)
        drawn[kind] += 1
        turn, misses = turn + 1, 0
        yield item


def corpus_document(stream: Iterator[Item], rng: random.Random, num_items: int,
                    think_rate: float) -> dict:
    """One training document of `num_items` items, a line each.

    Returns:
        {"text": ..., "answer_offsets": [character offset of each answer's first character]}
        (offsets count a thought's markers by their text; corpus loaders read "text" only).
    """
    text, offsets = "", []
    for _ in range(num_items):
        item = next(stream)
        line = item.text(think=rng.random() < think_rate)
        offsets.append(len(text) + len(line) - len(item.answer))
        text += line + "\n"
    return {"text": text.rstrip("\n"), "answer_offsets": offsets}


def benchmark_record(item: Item) -> dict:
    """A held-out benchmark line: `question` (evaluation frames it with PROMPT), the gold
    `answer`, the kind, the key and the working (for inspection; never shown to the model)."""
    return {"question": item.question, "answer": item.answer, "kind": item.kind,
            "key": item.key, "work": item.work}
