"""How many distinct instances each task kind (eval/tasks.py) has in a split, so that a request
for more than exist is refused up front instead of drawing forever.

The generators draw instances at random and skip repeats and the other split's instances;
asking for more than the split holds used to loop without end (`tools/make_tasks.py
--num-heldout 100 --digits 1`: `add` with one-digit operands has 81 instances, 8 held out).

- `instance_count(kind, digits)`: every instance of a kind, both splits (exact, by counting).
- `split_keys(kind, digits)`: every instance key, where the kind is small enough to list
  (`add` with up to 3 digits: 810,000); `chain` (6,070,960) and `lookup` (~2*10^13) are not.
- `split_size(...)`: a listed kind's exact count in one split (hashes every key, ~1 s).
- `split_shortfall(...)`: None when `wanted` instances of the split certainly exist, else the
  most that may be asked for: the exact split size where the kind can be listed, else the
  expected split size less 6 standard deviations (a split is a hash of each key, so its size
  is binomial: below that bound with probability ~1e-9; for `chain` at the default 10%:
  602,421 of an expected 607,096 held-out instances).

Near the bound the random drawing slows down (it rejects repeats), but it ends.

The counting repeats the drawing rules of `make_add` / `make_chain` / `make_lookup` (the
drawing is random, the counting exhaustive: they cannot share a loop);
tests/unit/test_eval_tasks.py checks that every drawn key follows these rules.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache

from megatron_rlp.eval.task_keys import OBJECTS, is_held_out

LISTABLE = 1_000_000  # most keys listed (hashed) to size a split exactly: ~1 s
_CHAIN_STARTS, _CHAIN_LENGTHS = range(2, 21), (2, 3)
_LOOKUP_TABLES, _PRICES, _QUANTITIES = (3, 4), 39, 8  # prices 2..40, quantities 2..9


def _chain_ops(value: int) -> list[tuple[str, int, int]]:
    """(key part, operand, result) of every operation `make_chain` may apply to `value`."""
    ops = [(f"multiplyby{o}", o, value * o) for o in (range(2, 10) if value < 100 else (2,))]
    if value > 2:
        ops += [(f"subtract{o}", o, value - o) for o in range(1, min(value - 1, 40) + 1)]
    return ops + [(f"add{o}", o, value + o) for o in range(2, 41)]


def instance_count(kind: str, digits: int = 3) -> int:
    """Distinct instances of `kind` over both splits (`digits`: operand size of `add`)."""
    if kind == "add":
        return (9 * 10 ** (digits - 1)) ** 2
    if kind == "chain":
        total, values = 0, Counter(_CHAIN_STARTS)
        for length in range(1, max(_CHAIN_LENGTHS) + 1):
            nxt = Counter()
            for value, n in values.items():
                for _, _, result in _chain_ops(value):
                    nxt[result] += n
            values = nxt
            total += sum(values.values()) if length in _CHAIN_LENGTHS else 0
        return total
    if kind == "lookup":
        objects = len(OBJECTS)
        return sum(math.perm(objects, t) * _PRICES**t * t * (t - 1) * _QUANTITIES**2
                   for t in _LOOKUP_TABLES)
    raise ValueError(f"unknown task kind {kind!r}")


def split_keys(kind: str, digits: int = 3) -> Iterator[str]:
    """Every instance key of `kind` (both splits), in the `Item.key` format.

    Raises:
        ValueError: a kind with more than LISTABLE instances (`chain`, `lookup`, `add` with
            more than 3 digits).
    """
    if kind != "add" or instance_count(kind, digits) > LISTABLE:
        raise ValueError(f"{kind} instances are too many to list")
    operands = range(10 ** (digits - 1), 10**digits)
    yield from (f"add:{a}+{b}" for a in operands for b in operands)


@lru_cache(maxsize=16)
def split_size(kind: str, digits: int, held_out_percent: float, held_out: bool) -> int:
    """Exact number of instances of `kind` in one split (lists and hashes every key).

    Raises:
        ValueError: the kind cannot be listed (see `split_keys`).
    """
    return sum(is_held_out(k, held_out_percent) == held_out for k in split_keys(kind, digits))


def split_fraction(held_out_percent: float, held_out: bool) -> float:
    """The share of the key hash space `is_held_out` gives to the split."""
    held = math.ceil(held_out_percent * 100) / 10_000
    return held if held_out else 1 - held


def split_shortfall(kind: str, wanted: int, *, held_out: bool, held_out_percent: float,
                    digits: int = 3) -> int | None:
    """None when the split certainly holds `wanted` distinct instances of `kind`, else the most
    that may be asked for (exact where the kind can be listed, else the 6-sigma bound).

    Costs nothing for requests inside the bound; lists the kind (~1 s for 3-digit `add`) only
    when `wanted` comes near it.
    """
    total = instance_count(kind, digits)
    expected = total * split_fraction(held_out_percent, held_out)
    bound = max(0, int(expected - 6 * math.sqrt(expected)))
    if wanted <= bound:
        return None
    if kind != "lookup" and total <= LISTABLE:
        bound = split_size(kind, digits, held_out_percent, held_out)
    return None if wanted <= bound else bound
