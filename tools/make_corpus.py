"""Writes the small pretraining corpus shipped in data/ (deterministic for a given seed).

RLP rewards a thought by how much it raises the probability of the true next token, so the
corpus favours text where reasoning helps predict what comes next: worked arithmetic, word
problems with their solutions, sequences, sorting and counting, unit conversions and simple
logic, mixed with plain English sentences. Every document mixes a few of these kinds.

Half of the documents (THINKING_DOC_RATE) are written with thoughts, the way reasoning traces
appear in real pretraining data; in those, 85% of the items that involve a computation
(THINKING_ITEM_RATE: arithmetic, word problems, sequences, conversions, and the counting, sum
and weekday items; never the stories) carry them, so about 40% of all such items do. Right
before a number that takes working out, `<think>...</think>` holds that working
(`17+25=42, 42*3=126`), and the text after `</think>` continues exactly as the thought-free
text would. So the model learns what a thought looks like, that it closes after a few dozen
bytes, and that it makes the next token predictable, while the thought-free documents and
items keep it able to predict without thinking.

Usage: python tools/make_corpus.py [--out data/corpus.jsonl] [--num-docs 2000] [--seed 1234]
"""

import argparse
import json
import math
import random
from pathlib import Path

# Document length bounds, in byte-tokenizer tokens (UTF-8 bytes, each thought marker one token).
MIN_DOC_TOKENS = 100
MAX_DOC_TOKENS = 1500
# Share of documents written with thoughts, and of the computing items in them that have them.
THINKING_DOC_RATE = 0.5
THINKING_ITEM_RATE = 0.85
# The byte tokenizer's special texts (megatron_rlp.tokenizer.base), encoded as single ids.
THINK_START = "<think>"
THINK_END = "</think>"

NAMES = (
    "Ada", "Ben", "Cara", "Dev", "Ela", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kai", "Lena",
    "Mia", "Noah", "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vik", "Wren", "Yara",
)
ITEMS = (
    "apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps", "shells",
    "cards", "coins", "eggs", "flowers", "buttons", "candles", "bottles", "blocks",
)
ANIMALS = ("fox", "owl", "rabbit", "cat", "dog", "bear", "duck", "horse", "mouse", "goat")
ADJECTIVES = ("small", "old", "curious", "quiet", "brave", "sleepy", "clever", "young", "kind")
PLACES = (
    "near a river", "in a busy town", "at the edge of a forest", "on a quiet farm",
    "by the sea", "in a house on a hill", "behind the old school", "in a green valley",
)
WORDS = (
    "banana", "letter", "mississippi", "parallel", "committee", "balloon", "bookkeeper",
    "address", "tomorrow", "engineer", "pepper", "coffee", "assessment", "success", "level",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# (big unit, small unit, small units per big unit)
UNITS = (
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24),
    ("weeks", "days", 7), ("feet", "inches", 12), ("yards", "feet", 3),
    ("liters", "milliliters", 1000), ("dollars", "cents", 100), ("dozens", "items", 12),
)
CATEGORIES = (
    ("cats", "animals"), ("roses", "flowers"), ("oaks", "trees"), ("trout", "fish"),
    ("hammers", "tools"), ("violins", "instruments"), ("squares", "rectangles"),
    ("sparrows", "birds"), ("apples", "fruits"), ("buses", "vehicles"),
)

IRREGULAR_SINGULAR = {"feet": "foot", "inches": "inch"}


def count_of(n: int, plural: str) -> str:
    """Returns e.g. "1 foot" or "3 feet"."""
    return f"{n} {IRREGULAR_SINGULAR.get(plural, plural[:-1]) if n == 1 else plural}"


def times(n: int) -> str:
    """Returns "once", "twice" or "n times"."""
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def token_length(text: str) -> int:
    """Returns the length of `text` in byte-tokenizer tokens: bytes, each marker one token."""
    markers = text.count(THINK_START) * (len(THINK_START) - 1)
    markers += text.count(THINK_END) * (len(THINK_END) - 1)
    return len(text.encode("utf-8")) - markers


def wants_thought(rng: random.Random, think_rate: float) -> bool:
    """Decides, once per item, whether the item is written with thoughts."""
    return rng.random() < think_rate


def thought(work: str) -> str:
    """Returns `work` wrapped in the thought markers."""
    return f"{THINK_START}{work}{THINK_END}"


def parts_of(n: int) -> list[int]:
    """Returns the nonzero place-value parts of `n`, e.g. 347 -> [300, 40, 7]."""
    digits = str(n)
    return [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"]


def work_add(a: int, b: int) -> str:
    """Working for a + b: tens first, then ones, e.g. "87+40=127, 127+7=134"."""
    if a < b and a < 10:
        a, b = b, a
    if b < 10 or b % 10 == 0:
        return f"{a}+{b}={a + b}"
    tens = b - b % 10
    return f"{a}+{tens}={a + tens}, {a + tens}+{b % 10}={a + b}"


def work_sub(a: int, b: int) -> str:
    """Working for a - b: tens first, then ones, e.g. "134-20=114, 114-5=109"."""
    if b < 10 or b % 10 == 0:
        return f"{a}-{b}={a - b}"
    tens = b - b % 10
    return f"{a}-{tens}={a - tens}, {a - tens}-{b % 10}={a - b}"


def work_mul(a: int, b: int) -> str:
    """Working for a * b: the larger factor by place value, e.g. "20*7=140, 3*7=21, 140+21=161"."""
    big, small = max(a, b), min(a, b)
    parts = parts_of(big)
    if len(parts) == 1:
        return f"{a}*{b}={a * b}"
    products = [p * small for p in parts]
    steps = [f"{p}*{small}={q}" for p, q in zip(parts, products, strict=True)]
    return ", ".join(steps) + f", {'+'.join(map(str, products))}={a * b}"


def work_div(a: int, b: int) -> str:
    """Working for an exact a / b, checked by multiplying back, e.g. "3*16=48"."""
    return f"{b}*{a // b}={a}"


def work(a: int, op: str, b: int) -> str:
    """Working for one operation."""
    return {"+": work_add, "-": work_sub, "*": work_mul, "/": work_div}[op](a, b)


def arithmetic_chain(rng: random.Random, think_rate: float) -> str:
    """A few chained operations, each written out with its result, or one nested expression."""
    think = wants_thought(rng, think_rate)
    style = rng.randrange(4)
    value = rng.randint(2, 99)
    steps = []
    for _ in range(rng.randint(2, 3) if style == 3 else rng.randint(2, 5)):
        op = rng.choice("+-*/")
        divisors = [d for d in range(2, 10) if value % d == 0]
        if op == "-" and value > 3:
            operand = rng.randint(1, value - 1)
            result = value - operand
        elif op == "*" and value < 500:
            operand = rng.randint(2, 9)
            result = value * operand
        elif op == "/" and divisors:
            operand = rng.choice(divisors)
            result = value // operand
        else:
            op, operand = "+", rng.randint(2, 99)
            result = value + operand
        steps.append((value, op, operand, result))
        value = result
    # With thoughts, the working of each result is written right before that result.
    worked = [(a, op, b, r, thought(work(a, op, b)) if think else "") for a, op, b, r in steps]
    if style == 0:
        return " ".join(f"{a} {op} {b} = {w}{r}." for a, op, b, r, w in worked)
    if style == 1:
        verbs = {"+": "Add", "-": "Subtract", "*": "Multiply by", "/": "Divide by"}
        text = [f"Start with {steps[0][0]}."]
        text += [f"{verbs[op]} {b} to get {w}{r}." for _, op, b, r, w in worked]
        return " ".join(text) + f" The result is {value}."
    if style == 2:
        lines = [
            f"Step {i + 1}: {a} {op} {b} = {w}{r}"
            for i, (a, op, b, r, w) in enumerate(worked)
        ]
        return "Compute step by step.\n" + "\n".join(lines) + f"\nAnswer: {value}"
    # One nested expression and its value, with no intermediate results in the text.
    expression = str(steps[0][0])
    for i, (_, op, b, _) in enumerate(steps):
        expression = f"{expression} {op} {b}" if i == 0 else f"({expression}) {op} {b}"
    chain = ", ".join(f"{a}{op}{b}={r}" for a, op, b, r in steps)
    return f"{expression} = {thought(chain) if think else ''}{value}."


def word_problem(rng: random.Random, think_rate: float) -> str:
    """A short word problem followed by its worked solution, or as Q/A with the answer only.

    With thoughts, the working goes right before each computed number; in the Q/A form, where
    the text gives no working at all, one thought before the answer does the whole sum.
    """
    think = wants_thought(rng, think_rate)
    qa = rng.random() < 0.5
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(5)

    def t(work_text: str) -> str:
        return thought(work_text) if think else ""

    if kind == 0:
        a, b = rng.randint(5, 60), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        question = (
            f"{name} has {a} {item}. {name} gets {b} more and gives {c} to {other}. "
            f"How many {item} does {name} have now?"
        )
        if qa:
            working = f"{a}+{b}={a + b}, {a + b}-{c}={a + b - c}"
            return f"Q: {question} A: {t(working)}{a + b - c} {item}."
        return (
            f"{question} Solution: {a} + {b} = {t(work_add(a, b))}{a + b}. "
            f"{a + b} - {c} = {t(work_sub(a + b, c))}{a + b - c}. Answer: {a + b - c}."
        )
    if kind == 1:
        rows, per = rng.randint(2, 12), rng.randint(2, 12)
        question = (
            f"There are {rows} boxes with {per} {item} in each box. How many {item} are there "
            f"in total?"
        )
        if qa:
            working = f"{rows} boxes of {per}: {work_mul(rows, per)}"
            return f"Q: {question} A: {t(working)}{rows * per} {item}."
        return (
            f"{question} Solution: {rows} * {per} = {t(work_mul(rows, per))}{rows * per}. "
            f"Answer: {rows * per}."
        )
    if kind == 2:
        count, price = rng.randint(2, 9), rng.randint(2, 15)
        paid = count * price + rng.randint(0, 20)
        cost, change = count * price, paid - count * price
        question = (
            f"{name} buys {count} {item} at {price} dollars each and pays with {paid} dollars. "
            f"What is the change?"
        )
        if qa:
            working = f"cost {count}*{price}={cost}, {paid}-{cost}={change}"
            return f"Q: {question} A: {t(working)}{change} dollars."
        return (
            f"{question} Solution: {count} * {price} = {t(work_mul(count, price))}{cost}. "
            f"{paid} - {cost} = {t(work_sub(paid, cost))}{change}. "
            f"Answer: {change} dollars."
        )
    if kind == 3:
        total, people = rng.randint(10, 99), rng.randint(2, 9)
        share, left = divmod(total, people)
        division = f"{people}*{share}={people * share}, {total}-{people * share}={left}"
        question = (
            f"{name} shares {total} {item} equally among {people} friends. How many does each "
            f"friend get, and how many are left?"
        )
        if qa:
            return f"Q: {question} A: {t(division)}{share} each, {left} left over."
        return (
            f"{question} Solution: {total} = {people} * {t(division)}{share} + "
            f"{left}. Each friend gets {share} and {left} are left over."
        )
    speed, hours = rng.randint(3, 90), rng.randint(2, 8)
    question = (
        f"A train travels at {speed} kilometers per hour for {hours} hours. How far does it go?"
    )
    if qa:
        working = f"distance {work_mul(speed, hours)}"
        return f"Q: {question} A: {t(working)}{speed * hours} kilometers."
    return (
        f"{question} Solution: distance = speed * time = {speed} * {hours} = "
        f"{t(work_mul(speed, hours))}{speed * hours}. Answer: {speed * hours} kilometers."
    )


def sequence(rng: random.Random, think_rate: float) -> str:
    """A number sequence continued, sometimes with its rule stated."""
    think = wants_thought(rng, think_rate)
    kind = rng.randrange(6)
    n = rng.randint(5, 10)
    if kind == 0:
        a, d = rng.randint(0, 50), rng.randint(1, 12)
        terms, rule = [a + d * i for i in range(n)], f"each term adds {d}"
    elif kind == 1:
        a, r = rng.randint(1, 5), rng.choice((2, 3))
        terms, rule = [a * r**i for i in range(n)], f"each term is multiplied by {r}"
    elif kind == 2:
        a = rng.randint(1, 6)
        terms, rule = [(a + i) ** 2 for i in range(n)], "the terms are square numbers"
    elif kind == 3:
        terms = [rng.randint(1, 3), rng.randint(1, 4)]
        while len(terms) < n:
            terms.append(terms[-1] + terms[-2])
        rule = "each term is the sum of the two before it"
    elif kind == 4:
        a, d = rng.randint(60, 120), rng.randint(2, 9)
        terms, rule = [a - d * i for i in range(n)], f"each term subtracts {d}"
    else:
        terms = [i * (i + 1) // 2 for i in range(1, n + 1)]
        rule = "the terms are triangular numbers"
    split = rng.randint(3, n - 2)
    shown, rest = ", ".join(map(str, terms[:split])), ", ".join(map(str, terms[split:]))
    # With thoughts, the rule is worked out from the terms shown right before the first
    # continued term.
    before, last, following = terms[split - 2], terms[split - 1], terms[split]
    if kind == 0:
        working = f"{last}-{before}={last - before}, {last}+{last - before}={following}"
    elif kind == 1:
        working = f"{last}/{before}={last // before}, {last}*{last // before}={following}"
    elif kind == 2:
        k = math.isqrt(last)
        working = f"{last}={k}*{k}, {k + 1}*{k + 1}={following}"
    elif kind == 3:
        working = f"{before}+{last}={following}"
    elif kind == 4:
        working = f"{before}-{last}={before - last}, {last}-{before - last}={following}"
    else:
        working = f"{last}-{before}={last - before}, {last}+{following - last}={following}"
    pause = thought(working) if think else ""
    if rng.random() < 0.4:
        return f"{shown}, {pause}{rest}."
    return f"The sequence {shown} continues with {pause}{rest}, because {rule}."


def counting_or_sorting(rng: random.Random, think_rate: float) -> str:
    """Counting letters or items, sorting numbers or words, or finding extremes."""
    think = wants_thought(rng, think_rate)
    kind = rng.randrange(5)
    if kind == 0:
        word = rng.choice(WORDS)
        letter = rng.choice(sorted(set(word)))
        count = word.count(letter)
        tally = thought(f"{' '.join([letter] * count)}: {count}") if think else ""
        return (
            f"How many times does the letter {letter} appear in {word}? "
            f"Spelled out: {', '.join(word)}. The letter {letter} appears "
            f"{tally}{times(count)}."
        )
    if kind == 1:
        picks = [rng.choice(ITEMS[:5]) for _ in range(rng.randint(4, 9))]
        target = rng.choice(picks)
        count = picks.count(target)
        positions = [str(i + 1) for i, pick in enumerate(picks) if pick == target]
        tally = thought(f"at {', '.join(positions)}: {count}") if think else ""
        return (
            f"In the list {', '.join(picks)}, the word {target} appears "
            f"{tally}{times(count)}. The list has {len(picks)} words."
        )
    numbers = rng.sample(range(1, 100), rng.randint(4, 8))
    listed = ", ".join(map(str, numbers))
    if kind == 2:
        order = rng.choice(("increasing", "decreasing"))
        ranked = sorted(numbers, reverse=order == "decreasing")
        return f"Sorted in {order} order, {listed} becomes {', '.join(map(str, ranked))}."
    if kind == 3:
        words = rng.sample(NAMES, rng.randint(4, 7))
        return f"In alphabetical order, {', '.join(words)} is {', '.join(sorted(words))}."
    running = [numbers[0]]
    for number in numbers[1:]:
        running.append(running[-1] + number)
    sums = f"{numbers[0]}+{numbers[1]}={running[1]}" + "".join(
        f", +{n}={s}" for n, s in zip(numbers[2:], running[2:], strict=True)
    )
    return (
        f"Among {listed}, the largest is {max(numbers)}, the smallest is {min(numbers)} "
        f"and the sum is {thought(sums) if think and len(numbers) <= 5 else ''}{sum(numbers)}."
    )


def unit_conversion(rng: random.Random, think_rate: float) -> str:
    """A unit conversion, worked out in one or two steps."""
    think = wants_thought(rng, think_rate)
    big, small, factor = rng.choice(UNITS)
    amount = rng.randint(2, 12)
    if rng.random() < 0.5:
        product = thought(work_mul(amount, factor)) if think else ""
        return (
            f"{amount} {big} = {amount} * {factor} {small} = {product}{amount * factor} {small}."
        )
    extra = rng.randint(1, factor - 1)
    total = amount * factor + extra
    division = f"{amount}*{factor}={amount * factor}, {total}-{amount * factor}={extra}"
    return (
        f"How many {big} and {small} are {total} {small}? There are {factor} {small} in "
        f"{count_of(1, big)}. {total} = {thought(division) if think else ''}{amount} * "
        f"{factor} + {extra}, so {total} {small} is {amount} {big} and {count_of(extra, small)}."
    )


def logic(rng: random.Random, think_rate: float) -> str:
    """A simple deduction: syllogism, ordering, parity, weekdays or a conditional."""
    think = wants_thought(rng, think_rate)
    kind = rng.randrange(5)
    if kind == 0:
        member, group = rng.choice(CATEGORIES)
        name = rng.choice(NAMES)
        return (
            f"All {member} are {group}. {name} keeps one of the {member}. "
            f"So {name} keeps one of the {group}."
        )
    if kind == 1:
        a, b, c = rng.sample(NAMES, 3)
        adjective = rng.choice(("taller", "older", "faster", "stronger"))
        return (
            f"{a} is {adjective} than {b}. {b} is {adjective} than {c}. "
            f"So {a} is {adjective} than {c}, and {c} is not {adjective} than {a}."
        )
    if kind == 2:
        n = rng.randint(10, 999)
        parity = "even" if n % 2 == 0 else "odd"
        return f"{n} ends in the digit {n % 10}, so {n} is {parity}. {n} + 1 = {n + 1}."
    if kind == 3:
        start, shift = rng.randrange(7), rng.randint(1, 20)
        end = DAYS[(start + shift) % 7]
        working = f"{shift}=7*{shift // 7}+{shift % 7}, {DAYS[start]}+{shift % 7}={end}"
        return (
            f"If today is {DAYS[start]}, then in {shift} days it will be "
            f"{thought(working) if think else ''}{end}, because {shift} = 7 * {shift // 7} + "
            f"{shift % 7}."
        )
    name = rng.choice(NAMES)
    cause, effect, negation = rng.choice((
        ("it rains", "the grass gets wet", "the grass is not wet"),
        ("the bell rings", "the class begins", "the class has not begun"),
        ("the light is red", "the cars stop", "the cars did not stop"),
    ))
    return (
        f"{name} knows that if {cause}, {effect}. {name} sees that {negation}. "
        f"So {name} concludes that it is not true that {cause}."
    )


def story(rng: random.Random, think_rate: float) -> str:
    """A few plain English sentences: an animal fable, a day's schedule or a small errand.

    Never with thoughts (`think_rate` is ignored): plain narrative is where predicting without
    thinking is the norm.
    """
    kind = rng.randrange(3)
    item = rng.choice(ITEMS)
    if kind == 0:
        adjective, animal = rng.choice(ADJECTIVES), rng.choice(ANIMALS)
        friend = rng.choice([a for a in ANIMALS if a != animal])
        sentences = [
            f"Once there was a {adjective} {animal} who lived {rng.choice(PLACES)}.",
            f"Every morning the {animal} went out to look for {item}.",
            f"One day it met a {friend} who had lost its way.",
            f"The {animal} showed the {friend} the path home.",
            f"After that, the {friend} and the {animal} were good friends.",
            f"They often shared their {item} and told each other stories.",
        ]
        return " ".join(sentences[: rng.randint(3, len(sentences))])
    name = rng.choice(NAMES)
    if kind == 1:
        hour = rng.randint(6, 9)
        sentences = [f"{name} woke up at {hour} o'clock."]
        for activity in rng.sample(
            ("had breakfast", "went to school", "read a book", "walked the dog",
             "visited a friend", "cleaned the kitchen", "played in the park"), 3,
        ):
            gap = rng.randint(1, 3)
            hour += gap
            sentences.append(
                f"{count_of(gap, 'hours').capitalize()} later, at {hour} o'clock, "
                f"{name} {activity}."
            )
        return " ".join(sentences) + f" The day was long but {name} was happy."
    first, second = rng.randint(2, 9), rng.randint(2, 9)
    return (
        f"{name} went {rng.choice(PLACES)} to collect {item}. "
        f"In the morning {name} found {first}, and in the afternoon {second} more. "
        f"By the evening {name} had {first + second} {item} and carried them home in a bag."
    )


GENERATORS = (
    arithmetic_chain, word_problem, sequence, counting_or_sorting, unit_conversion, logic, story,
)


def make_document(rng: random.Random) -> str:
    """One document: segments of two or three kinds until a random target length (in tokens).

    A thinking document (THINKING_DOC_RATE) writes most of its computing items with thoughts;
    the others have none.
    """
    think_rate = THINKING_ITEM_RATE if rng.random() < THINKING_DOC_RATE else 0.0
    kinds = rng.sample(GENERATORS, rng.randint(2, 3))
    target = rng.randint(MIN_DOC_TOKENS, MAX_DOC_TOKENS)
    text = rng.choice(kinds)(rng, think_rate)
    length = token_length(text)
    while length < target:
        segment = rng.choice(kinds)(rng, think_rate)
        if length >= MIN_DOC_TOKENS and length + 1 + token_length(segment) > MAX_DOC_TOKENS:
            break
        text += "\n" + segment
        length += 1 + token_length(segment)
    return text


def main() -> None:
    """Writes the corpus as JSONL, one {"text": ...} document per line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/corpus.jsonl"))
    parser.add_argument("--num-docs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8", newline="\n") as f:
        for _ in range(args.num_docs):
            f.write(json.dumps({"text": make_document(rng)}, ensure_ascii=False) + "\n")
    with args.out.open(encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    thoughts = [
        span.split(THINK_END)[0] for text in texts for span in text.split(THINK_START)[1:]
    ]
    with_thoughts = sum(THINK_START in text for text in texts)
    mean = sum(map(len, thoughts)) / max(len(thoughts), 1)
    print(
        f"wrote {args.num_docs} documents, {args.out.stat().st_size} bytes, to {args.out}; "
        f"{with_thoughts} documents have thoughts ({len(thoughts)} thoughts, "
        f"{mean:.1f} bytes each on average)"
    )


if __name__ == "__main__":
    main()
