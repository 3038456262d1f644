"""A wall-clock timer per phase (rollout, scoring, update), as verl keeps one per stage."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Accumulates seconds per named phase; `pop()` returns and clears them.

    With `cpu=True` each phase also gets `<phase>_cpu`: the CPU seconds of the calling
    thread (`time.thread_time`). On a shared machine a one-thread process's CPU time leaves
    out the time it waited for a core (tools/bench_rlp.py compares paths by it).
    """

    def __init__(self, cpu: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu = cpu

    @contextmanager
    def __call__(self, phase: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # GPU work is asynchronous: time it, not its launch
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
            if self.cpu:
                key = f"{phase}_cpu"
                self.seconds[key] = self.seconds.get(key, 0.0) + time.thread_time() - cpu

    def pop(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out
