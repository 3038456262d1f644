"""A hung rank ends the job with its stacks (train/watchdog.py): one rank of two stops at the
start of step 2 (the `step_stall` fault hook) or in the middle of writing the checkpoint of
step 2 (`save_stall`), the other waits for it in a collective. With a 3 s watchdog both
leave within the limit plus a margin, exit 3, each printing every thread's stack tagged with
its rank; the checkpoint of step 1 stays `latest` and loads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers.checkpoint_helpers import CONFIG, ROOT, SMALL, ok

from megatron_rlp.train.watchdog import EXIT_CODE

LIMIT_S = 3.0  # train.watchdog_minutes=0.05
MARGIN_S = 20.0  # two shared CPU cores: start-up noise, not the watchdog's


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(overrides: list[str], world: int, faults: str = "") -> list[subprocess.Popen]:
    port = _port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE",
                                                                        "LOCAL_", "MASTER_"))}
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", MEGATRON_RLP_FAULTS=faults, PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(
            [sys.executable, "pretrain_rlp.py", "--config", CONFIG, *SMALL, *overrides],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.parametrize("fault, what, marker, where", [
    # rank 1 asleep at the start of step 2; rank 0 in the step's first all-reduce
    ("step_stall@2", "step 2", "[fault] step stalled", ("should_stop", "stall_if_planned")),
    # rank 1's checkpoint writer stalls in the save of step 2; rank 0 waits in the save
    ("save_stall@2", "the checkpoint save of step 2", "[fault] save stalled",
     ("save_checkpoint", "save_checkpoint")),
], ids=["in-a-step", "in-a-save"])
def test_stalled_rank_ends_the_job_with_every_stack(tmp_path, fault, what, marker, where):
    save = tmp_path / "ckpt"
    procs = _launch(["train.steps=2", "train.save_interval=1", f"train.save={save}",
                     "train.watchdog_minutes=0.05", "train.distributed_timeout_minutes=2"],
                    world=2, faults=fault)
    stalled_at: list[float] = []
    errs = ["", ""]
    ended = [0.0, 0.0]

    def read(i: int) -> None:
        for line in procs[i].stderr:
            errs[i] += line
            if marker in line:
                stalled_at.append(time.monotonic())
        procs[i].wait()
        ended[i] = time.monotonic()

    readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for r in readers:
        r.start()
    for r in readers:
        r.join(timeout=240)
    for p in procs:
        if p.poll() is None:
            p.kill()
    assert stalled_at, errs
    for rank, p in enumerate(procs):
        assert p.returncode == EXIT_CODE, (rank, p.returncode, errs[rank][-3000:])
        took = ended[rank] - stalled_at[0]
        assert took <= LIMIT_S + MARGIN_S, (rank, took)
        header = f"[rank {rank}] [watchdog] {what} did not finish within 3 s"
        assert header in errs[rank], errs[rank][-3000:]
        stack = [ln for ln in errs[rank].splitlines() if ln.startswith(f"[rank {rank}] ")]
        assert any("Thread 0x" in ln or "Current thread" in ln for ln in stack), stack
        assert any(where[rank] in ln for ln in stack), (rank, stack)
    assert (save / "latest").read_text().strip() == "step_00000001"
    # the previous checkpoint still loads (one rank, in this process: a new layout is fine)
    load = ok("train.steps=1", f"train.load={save}")
    assert "[load] resumed" in load.out and "at step 1" in load.out
