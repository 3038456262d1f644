"""Suite-wide pytest hooks.

- `tests/` is on `sys.path` (pytest's default rootdir-conftest insertion), so the shared test
  helpers in `tests/helpers/` import as `helpers.<module>` from every test directory.
- `state`: one built TrainState per test module (one rank, gloo, CPU) of
  examples/configs/tiny_cpu.yaml with the module's `TINY` overrides.
- Honest skips: after the run, one line says how many tests were skipped and why, grouped by
  reason (e.g. "SLURM/munge not installed", "shellcheck not installed"), so `make test` never
  looks greener than it is; tests left out by `-m "not slow"` are counted on the same line.
  Which tests need which system packages: docs/testing.md.
"""

from __future__ import annotations

from collections import Counter

import pytest


@pytest.fixture(scope="module")
def state(request):
    """A built `TrainState` (world size 1) of examples/configs/tiny_cpu.yaml with the test
    module's `TINY` tuple of `section.key=value` overrides; torch.distributed is up while the
    module's tests run and shut down after them."""
    from megatron_rlp import distributed
    from megatron_rlp.config import load_config
    from megatron_rlp.train.builder import build_state

    cfg = load_config("examples/configs/tiny_cpu.yaml", request.module.TINY, world_size=1)
    distributed.initialize(cfg)
    yield build_state(cfg)
    distributed.shutdown()


def _reason(report) -> str:
    """The skip message of a skipped test report (pytest stores (file, line, message))."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        message = str(longrepr[2])
    else:
        message = str(longrepr)
    return message.removeprefix("Skipped: ").strip()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    deselected = len(terminalreporter.stats.get("deselected", []))
    if not skipped and not deselected:
        return
    reasons = Counter(_reason(r) for r in skipped)
    parts = [f"{n} x {reason}" for reason, n in reasons.most_common()]
    if deselected:  # pytest.ini's `-m "not slow"`, or a -k/-m of the caller
        parts.append(f"{deselected} deselected (slow ones run with `pytest -m slow`)")
    terminalreporter.write_line(f"SKIPPED {len(skipped)} test(s): {'; '.join(parts)}")
