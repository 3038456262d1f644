"""Every patch of Megatron-Core's private parts that checkpointing needs, in one place.

Each patch names the Megatron function it replaces or wraps, why, and the megatron-core
version it was checked against (`MEGATRON_CORE_CHECKED`). They touch private names, so a
megatron-core upgrade must re-read each target; the checkpoint tests
(tests/e2e/test_checkpoint_*.py, test_resume_options.py) fail if one stops fitting.

    use_thread_queue   dist_checkpointing.strategies.filesystem_async._results_queue
    writer_faults      dist_checkpointing.strategies.filesystem_async._write_item (tests only)
    step_entries       optimizer.distrib_optimizer.DistributedOptimizer
                       ._set_main_param_and_optimizer_states (per instance, while loading)
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import queue
import sys
import time

from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_rlp.train import faults

MEGATRON_CORE_CHECKED = "0.19.2"


def use_thread_queue() -> None:
    """Set `filesystem_async._results_queue` (what `get_write_results_queue` returns) to a
    plain `queue.Queue`, once per process.

    Why: dist_checkpointing's synchronous save writes in threads but collects results through
    a `multiprocessing.Manager` queue, which spawns a server process (~5 s, and an orphan if
    the job is killed). A plain queue serves threads (shared/MEGATRON_CPU.md).
    Checked against megatron-core 0.19.2.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


@contextlib.contextmanager
def writer_faults(step: int):
    """Wrap `filesystem_async._write_item` (Megatron's per-item file writer) while saving
    checkpoint `step`, when the test hook (train/faults.py) plans `save_enospc` or
    `save_stall` for it: after the first item is written and flushed, raise
    OSError(ENOSPC), or print `[fault] save stalled` and sleep.

    Why: the reliability tests need a full disk and a kill in the middle of a real save,
    inside Megatron's writer threads. No-op in real runs (no faults planned).
    Checked against megatron-core 0.19.2.
    """
    kinds = [k for k in ("save_enospc", "save_stall") if faults.planned(k, step)]
    if not kinds:
        yield
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    original = filesystem_async._write_item

    @functools.wraps(original)  # Megatron inspects its signature
    def write_item(*args, **kwargs):
        result = original(*args, **kwargs)
        for stream in (a for a in args if isinstance(a, io.IOBase)):
            stream.flush()  # part of the file is on disk
        if "save_enospc" in kinds:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        print("[fault] save stalled", file=sys.stderr, flush=True)
        time.sleep(600)
        return result

    filesystem_async._write_item = write_item
    try:
        yield
    finally:
        filesystem_async._write_item = original


@contextlib.contextmanager
def step_entries(optimizers: list):
    """Wrap `DistributedOptimizer._set_main_param_and_optimizer_states` on each distributed
    optimizer in `optimizers` (per instance, removed on exit) so that the state it copies
    always has a `step` entry (a `None` placeholder).

    Why: `fully_reshardable` loading copies every tensor of torch Adam's per-parameter state
    from the checkpoint, `step` included, but the checkpoint keeps `step` in the param groups
    (restored separately, `optimizer.restore_steps`): without a placeholder entry it raises
    KeyError('step'). Checked against megatron-core 0.19.2.
    """
    patched = [o for o in optimizers if isinstance(o, DistributedOptimizer)]
    for o in patched:
        original = o._set_main_param_and_optimizer_states
        o._set_main_param_and_optimizer_states = (
            lambda param, tensors, _f=original: _f(param, {"step": None, **tensors}))
    try:
        yield
    finally:
        for o in patched:
            del o._set_main_param_and_optimizer_states  # back to the class method
