"""Fault injection for the reliability tests, and the errors a run stops with.

Tests set `MEGATRON_RLP_FAULTS` (never set in real runs) to a comma-separated list of
`kind@step`; each fault fires on the *last* global rank only (unless marked every rank), so
the tests also check that every rank reaches the same decision:

    nan_grad@K      after the backward of step K, one gradient element becomes NaN
    save_enospc@K   writing checkpoint step K fails with OSError(ENOSPC) after part of a file
                    is on disk (a full disk, simulated inside Megatron's checkpoint writer)
    save_stall@K    writing checkpoint step K stops after part of a file is on disk and
                    prints `[fault] save stalled` to stderr, so a test can SIGKILL the job
                    in the middle of a save
    step_stall@K    at the start of step K the rank stops (sleeps) and prints `[fault] step
                    stalled`, while the others wait for it in the step's first collective
                    (a hung rank; the watchdog test, train/watchdog.py)
    router_flip@K   (every rank) after the rollout of step K, the first MoE layer's router
                    on the first pipeline stage is negated, so the update routes elsewhere
                    than the rollout (`routing_agreement` < 1, models/moe_routing.py)
    routing_record_flip@K   (every rank) likewise, the rollout's record of that layer's
                    routing is inverted instead (`routing_agreement` = 0)

Everything else in a test run is the real code path.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "MEGATRON_RLP_FAULTS"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); phrased for the user."""


class DataError(RuntimeError):
    """The training data cannot be used; phrased for the user."""


def planned(kind: str, step: int, every_rank: bool = False) -> bool:
    """Whether the test hook asks for fault `kind` at `step` on this process (the last
    global rank only, unless `every_rank`)."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return False
    import torch.distributed as dist

    if (not every_rank and dist.is_initialized()
            and dist.get_rank() != dist.get_world_size() - 1):
        return False
    return f"{kind}@{step}" in {item.strip() for item in spec.split(",")}


def stall_if_planned(kind: str, step: int, seconds: float = 600.0) -> None:
    """Test hook: stop this rank for `seconds` when fault `kind` is planned at `step`."""
    if planned(kind, step):
        print(f"[fault] {kind.replace('_', ' ').replace('stall', 'stalled')} (step {step})",
              file=sys.stderr, flush=True)
        time.sleep(seconds)
