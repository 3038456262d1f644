"""Writes the small pretraining corpus shipped in data/ (deterministic for a given seed).

RLP rewards a thought by how much it raises the probability of the true next token, so the
corpus favours text where reasoning helps predict what comes next: worked arithmetic, word
problems with their solutions, sequences, sorting and counting, unit conversions and simple
logic, mixed with plain English sentences. Every document mixes a few of these kinds.

Usage: python tools/make_corpus.py [--out data/corpus.jsonl] [--num-docs 2000] [--seed 1234]
"""

import argparse
import json
import random
from pathlib import Path

MIN_DOC_BYTES = 100
MAX_DOC_BYTES = 1500

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


def arithmetic_chain(rng: random.Random) -> str:
    """A few chained operations, each written out with its result."""
    value = rng.randint(2, 99)
    steps = []
    for _ in range(rng.randint(2, 5)):
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
    style = rng.randrange(3)
    if style == 0:
        return " ".join(f"{a} {op} {b} = {r}." for a, op, b, r in steps)
    if style == 1:
        verbs = {"+": "Add", "-": "Subtract", "*": "Multiply by", "/": "Divide by"}
        text = [f"Start with {steps[0][0]}."]
        text += [f"{verbs[op]} {b} to get {r}." for _, op, b, r in steps]
        return " ".join(text) + f" The result is {value}."
    lines = [f"Step {i + 1}: {a} {op} {b} = {r}" for i, (a, op, b, r) in enumerate(steps)]
    return "Compute step by step.\n" + "\n".join(lines) + f"\nAnswer: {value}"


def word_problem(rng: random.Random) -> str:
    """A short word problem followed by its worked solution."""
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(5, 60), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        return (
            f"{name} has {a} {item}. {name} gets {b} more and gives {c} to {other}. "
            f"How many {item} does {name} have now? "
            f"Solution: {a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}. Answer: {a + b - c}."
        )
    if kind == 1:
        rows, per = rng.randint(2, 12), rng.randint(2, 12)
        return (
            f"There are {rows} boxes with {per} {item} in each box. How many {item} are there "
            f"in total? Solution: {rows} * {per} = {rows * per}. Answer: {rows * per}."
        )
    if kind == 2:
        count, price = rng.randint(2, 9), rng.randint(2, 15)
        paid = count * price + rng.randint(0, 20)
        return (
            f"{name} buys {count} {item} at {price} dollars each and pays with {paid} dollars. "
            f"What is the change? Solution: {count} * {price} = {count * price}. "
            f"{paid} - {count * price} = {paid - count * price}. "
            f"Answer: {paid - count * price} dollars."
        )
    if kind == 3:
        total, people = rng.randint(10, 99), rng.randint(2, 9)
        share, left = divmod(total, people)
        return (
            f"{name} shares {total} {item} equally among {people} friends. How many does each "
            f"friend get, and how many are left? Solution: {total} = {people} * {share} + "
            f"{left}. Each friend gets {share} and {left} are left over."
        )
    speed, hours = rng.randint(3, 90), rng.randint(2, 8)
    return (
        f"A train travels at {speed} kilometers per hour for {hours} hours. How far does it go? "
        f"Solution: distance = speed * time = {speed} * {hours} = {speed * hours}. "
        f"Answer: {speed * hours} kilometers."
    )


def sequence(rng: random.Random) -> str:
    """A number sequence continued, sometimes with its rule stated."""
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
    if rng.random() < 0.4:
        return f"{', '.join(map(str, terms))}."
    return f"The sequence {shown} continues with {rest}, because {rule}."


def counting_or_sorting(rng: random.Random) -> str:
    """Counting letters or items, sorting numbers or words, or finding extremes."""
    kind = rng.randrange(5)
    if kind == 0:
        word = rng.choice(WORDS)
        letter = rng.choice(sorted(set(word)))
        return (
            f"How many times does the letter {letter} appear in {word}? "
            f"Spelled out: {', '.join(word)}. The letter {letter} appears "
            f"{times(word.count(letter))}."
        )
    if kind == 1:
        picks = [rng.choice(ITEMS[:5]) for _ in range(rng.randint(4, 9))]
        target = rng.choice(picks)
        return (
            f"In the list {', '.join(picks)}, the word {target} appears "
            f"{times(picks.count(target))}. The list has {len(picks)} words."
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
    return (
        f"Among {listed}, the largest is {max(numbers)}, the smallest is {min(numbers)} "
        f"and the sum is {sum(numbers)}."
    )


def unit_conversion(rng: random.Random) -> str:
    """A unit conversion, worked out in one or two steps."""
    big, small, factor = rng.choice(UNITS)
    amount = rng.randint(2, 12)
    if rng.random() < 0.5:
        return f"{amount} {big} = {amount} * {factor} {small} = {amount * factor} {small}."
    extra = rng.randint(1, factor - 1)
    total = amount * factor + extra
    return (
        f"How many {big} and {small} are {total} {small}? There are {factor} {small} in "
        f"{count_of(1, big)}. {total} = {amount} * {factor} + {extra}, so {total} {small} is "
        f"{amount} {big} and {count_of(extra, small)}."
    )


def logic(rng: random.Random) -> str:
    """A simple deduction: syllogism, ordering, parity, weekdays or a conditional."""
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
        return (
            f"If today is {DAYS[start]}, then in {shift} days it will be "
            f"{DAYS[(start + shift) % 7]}, because {shift} = 7 * {shift // 7} + {shift % 7}."
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


def story(rng: random.Random) -> str:
    """A few plain English sentences: an animal fable, a day's schedule or a small errand."""
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
    """One document: segments of two or three kinds until a random target length."""
    kinds = rng.sample(GENERATORS, rng.randint(2, 3))
    target = rng.randint(MIN_DOC_BYTES, MAX_DOC_BYTES)
    text = rng.choice(kinds)(rng)
    while len(text) < target:
        segment = rng.choice(kinds)(rng)
        if len(text) >= MIN_DOC_BYTES and len(text) + 1 + len(segment) > MAX_DOC_BYTES:
            break
        text += "\n" + segment
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
    print(f"wrote {args.num_docs} documents, {args.out.stat().st_size} bytes, to {args.out}")


if __name__ == "__main__":
    main()
