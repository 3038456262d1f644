"""What a task instance's key is made of and which split it falls in: the objects of the
lookup tasks and the held-out hash. `tasks.py` draws instances from them and `task_space.py`
counts the instances of a split; `tasks.py` imports `task_space.py`, not the reverse."""

from __future__ import annotations

import hashlib

OBJECTS = (("pen", "pens"), ("cup", "cups"), ("hat", "hats"), ("book", "books"),
            ("lamp", "lamps"), ("ball", "balls"), ("kite", "kites"), ("bell", "bells"),
            ("sock", "socks"), ("mug", "mugs"), ("fork", "forks"), ("coin", "coins"))


def is_held_out(key: str, held_out_percent: float) -> bool:
    """Whether the instance `key` belongs to the held-out split: a SHA-256 of the key, so the
    split depends on the instance alone (not on the seed, the order or the kind mix)."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return digest % 10_000 < held_out_percent * 100
