"""Run a fake-CUDA test in a fresh process when an earlier test of this process mapped
`cuda` to the CPU (`megatron_rlp.backends.cpu` is active): FakeTensorMode's
`device="cuda"` then makes CPU tensors, which the simulation's device checks refuse."""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cuda_is_mapped_to_cpu() -> bool:
    """Whether this process runs the CPU backend (`backends.cpu.activate`)."""
    from megatron_rlp.backends import cpu as cpu_backend

    return cpu_backend.is_active()


def rerun_in_fresh_process(test_file: str | Path, name: str) -> None:
    """Run test `name` of `test_file` alone in a new pytest process; fail with its output
    unless it passed."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{Path(test_file).resolve()}::{name}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:]


def fresh_process_if_cuda_is_mapped(test):
    """Decorator: the test runs here, or alone in a fresh process when `cuda` is mapped to
    the CPU in this one (its fixtures are still set up here, then unused)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        if cuda_is_mapped_to_cpu():
            return rerun_in_fresh_process(inspect.getsourcefile(test), test.__name__)
        return test(*args, **kwargs)

    return run
