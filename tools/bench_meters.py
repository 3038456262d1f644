"""Meters of tools/bench_rlp.py (and its sibling benches): peak memory of a block, the
rollout's decode steps and cache bytes, a plain matmul's FLOP rate, graph compilations.

Written here because Megatron's timers measure phases of the trainer, not these."""

from __future__ import annotations

import ctypes
import threading
import time


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or on CPU the bytes glibc malloc has handed
    out (`mallinfo2`: heap in use + mmapped blocks; torch's CPU allocator uses malloc),
    sampled every 2 ms by a thread. Peak RSS cannot tell two paths of one process apart (it
    never goes down, and freed memory stays mapped). Reported as the increase over the
    block's start."""

    def __init__(self):
        self.peak = 0

    @staticmethod
    def _in_use() -> int:
        info = _LIBC.mallinfo2()
        return info.uordblks + info.hblkhd

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start, self.peak, self.stop = self._in_use(), self._in_use(), threading.Event()

        def sample():
            while not self.stop.wait(0.002):
                self.peak = max(self.peak, self._in_use())

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self._in_use())
        self.bytes = self.peak - self.start


class DecodeMeter:
    """Decode steps of this project's rollouts: wall time of `KVCacheEngine.step` (mask
    bookkeeping + the model forward, sampling excluded) and their number, and the cache's
    bytes right after the G-way fork (`packing.cascade.cache_bytes`: C x P + R x T per
    attention layer with cascade decode, R x (P + T) without)."""

    def __init__(self):
        self.seconds, self.steps, self.cache_bytes = 0.0, 0, 0

    def __enter__(self):
        from megatron_rlp.packing import decode
        from megatron_rlp.packing.cascade import cache_bytes
        from megatron_rlp.rollout.engine import KVCacheEngine

        meter, self.undo = self, []
        for cls in (KVCacheEngine, decode.SharedPrefixEngine):
            fork = cls.__dict__["fork"]

            def forked(engine, n, _fork=fork):
                _fork(engine, n)
                meter.cache_bytes = max(meter.cache_bytes, cache_bytes(engine.ctx))
            self.undo.append((cls, "fork", fork))
            cls.fork = forked
        depth = [0]  # the compiled engine's step calls the plain one before the fork
        for cls in (KVCacheEngine, decode.SharedPrefixEngine):
            step = cls.__dict__["step"]

            def timed(engine, tokens, _step=step):
                depth[0] += 1
                start = time.perf_counter()
                try:
                    return _step(engine, tokens)
                finally:
                    depth[0] -= 1
                    if not depth[0]:
                        meter.seconds += time.perf_counter() - start
                        meter.steps += 1
            self.undo.append((cls, "step", step))
            cls.step = timed
        return self

    def __exit__(self, *exc):
        for cls, name, fn in reversed(self.undo):
            setattr(cls, name, fn)


def matmul_flop_per_s(n: int = 1024, repeats: int = 5) -> float:
    """A plain fp32 [n, n] @ [n, n] matmul's FLOP rate on this process's threads (best of
    `repeats`): the yardstick for the update's achieved rate."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best
