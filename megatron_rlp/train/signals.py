"""Pre-emption: stop cleanly at the next step boundary on SIGTERM / SIGUSR1 / SIGINT or a
wall-time limit.

A signal may reach only some ranks (or reach them between different steps), so the decision
is collective: at every step boundary each rank contributes its flag to one all-reduce(MAX)
over the world, and all ranks stop after the same step, save together and exit 0.

One stop request often arrives more than once: under `srun`, slurmstepd signals every process
of the step and the launcher (examples/slurm/common.sh) forwards it to the trainers too. So
once a signal has been caught, further ones are ignored until the process ends: restoring the
default action would let a late duplicate kill a rank that has saved and is exiting.

Ctrl-C (SIGINT) is a stop request too: the first one stops and saves like SIGTERM; a second
one, while the guard holds, aborts at once (KeyboardInterrupt, nothing saved), as a user
pressing it twice means.
"""

from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _process_start() -> float:
    """Wall-clock start of this process (the time a scheduler's limit counts from)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or restricted: count from now
        return time.time()


class StopGuard:
    """Catches the stop signals for the duration of a `with` block and answers, collectively,
    whether the run should stop now.

    Args:
        wall_time_limit_minutes: stop once this process has run this long (0 = never).
        device: where the all-reduce flag lives (cpu for gloo, cuda for nccl).
    """

    def __init__(self, wall_time_limit_minutes: float = 0.0, device: str = "cpu"):
        self.limit_s = wall_time_limit_minutes * 60.0
        self.device = device
        self.start = _process_start()
        self.received: int | None = None  # the first signal caught on this rank
        self.reason: str | None = None  # why the run stopped (same on every rank)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # After a stop request, ignore duplicates (SIG_IGN, unlike a Python handler,
            # survives interpreter shutdown, which resets handlers to the default action);
            # Ctrl-C gets its handler back, so pressing it again still interrupts.
            stopped = self.received is not None and sig != signal.SIGINT
            signal.signal(sig, signal.SIG_IGN if stopped else handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        # Only set a flag: the step in flight (and any collective in it) must finish.
        if self.received is None:
            self.received = signum
            if signum == signal.SIGINT:
                print("[stop] Ctrl-C: stopping after this step and saving it (Ctrl-C again to "
                      "abort without saving)", flush=True)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank caught a signal or ran out of time."""
        over_time = bool(self.limit_s) and time.time() - self.start >= self.limit_s
        flags = torch.tensor([self.received or 0, int(over_time)], dtype=torch.int32,
                             device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, over_time = (int(v) for v in flags.tolist())
        if signum:
            self.reason = f"{signal.Signals(signum).name} received"
        elif over_time:
            self.reason = f"wall-time limit of {self.limit_s / 60:g} min reached"
        return bool(signum or over_time)
