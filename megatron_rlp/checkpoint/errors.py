"""Checkpoint errors agreed across ranks: a failure on any rank becomes the same one-line
`CheckpointError` on every rank, with the real cause dug out of Megatron's and torch DCP's
wrappers, and their log noise kept off the console.

Megatron functions used: none directly; `reason` unwraps what
`megatron.core.dist_checkpointing` and `torch.distributed.checkpoint` raise and log.
Collectives: `torch.distributed.all_gather_object`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as DCPException


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used, phrased for the user (one line)."""


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def agree(error: str | None) -> None:
    """Collective: raise CheckpointError(first error) on every rank if any rank has one."""
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)


def on_rank0(fn, context: str) -> None:
    """Run filesystem work `fn` on rank 0 only; its failure is raised on every rank."""
    error = None
    if rank() == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported as one line, on every rank
            error = f"{context}: {reason(e)}"
    agree(error)


def reason(e: BaseException, logged: list[str] = ()) -> str:
    """One line for an exception. Megatron's writer threads and torch DCP wrap the real cause
    several times (chained, or per rank in `failures`), and Megatron's writer keeps only the
    class of a thread's exception, logging its text (`logged`, from `quiet`): report an
    OSError found anywhere in there (disk full, permissions), else the innermost exception."""
    seen, order, stack = set(), [], [e]
    while stack:
        cur = stack.pop(0)
        if not isinstance(cur, BaseException) or id(cur) in seen:
            continue
        seen.add(id(cur))
        order.append(cur)
        if isinstance(cur, OSError) and cur.errno:
            where = f" ({cur.filename})" if cur.filename else ""
            return f"{cur.strerror or os.strerror(cur.errno)} [errno {cur.errno}]{where}"
        stack += [cur.__cause__, cur.__context__]
        for failure in getattr(cur, "failures", {}).values():  # DCP CheckpointException
            stack += list(failure) if isinstance(failure, tuple) else [failure]
    for message in logged:
        if m := re.search(r"\[Errno (\d+)\] ([^'\n]*)", message):
            return f"{m.group(2).strip()} [errno {m.group(1)}]"
    leaf = next((x for x in reversed(order) if not isinstance(x, DCPException)), e)
    text = str(leaf).strip().splitlines()
    return f"{type(leaf).__name__}: {text[0]}" if text else type(leaf).__name__


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def quiet():
    """Keep checkpoint I/O off the console and collect its error log lines.

    Megatron logs a deprecation note on every save and each writer thread's error (the
    exception it raises then names only the error's class); torch DCP warns on the root
    logger with a traceback when it falls back to per-rank metadata. Failures come back to us
    as exceptions and are reported once, with the collected messages as the cause.
    """
    collect = _Collect()
    names = ("megatron.core.dist_checkpointing", "torch.distributed.checkpoint")
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    root = logging.getLogger()
    root_level = root.level
    for lg in loggers:
        lg.addHandler(collect)
        lg.propagate = False
    root.setLevel(logging.ERROR)
    try:
        yield collect.messages
    finally:
        root.setLevel(root_level)
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(collect)
            lg.setLevel(level)
            lg.propagate = propagate
