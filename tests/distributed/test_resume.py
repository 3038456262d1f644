"""Checkpoints of 2-process `torchrun` jobs (gloo) that are resumed, killed, signalled and
resharded. Every job's processes are killed when its test ends, pass or fail.

1. DP=2 with the distributed optimizer: 6 steps straight (saving step 3) against a job that
   resumes from step 3: steps 4-6 give identical metrics and a bit-identical step-6
   checkpoint (policy, EMA teacher, Adam moments, the optimizer's fp32 copies). That job is
   then SIGKILLed, all processes, in the middle of writing step 9 (a test hook stalls rank 1's
   file writer after part of a file is on disk): step 6 stays `latest` and loads (on one rank:
   a DP reshard), and the next save clears the partial directory.
2. TP=2: SIGTERM to torchrun and both workers at once (what `scancel` does): the workers save
   at the next step boundary; the checkpoint loads into TP=1 in this process, where it is
   saved again bit-identical (global tensors) and training continues.
3. PP=2: SIGUSR1 to rank 1 alone: both ranks stop after the same step, save and exit 0
   (torchrun too); the checkpoint continues with PP=1 likewise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers.checkpoint_helpers import (
    ROOT,
    SMALL,
    assert_same_rows,
    assert_same_tensors,
    latest,
    ok,
    read_tensors,
    rows,
)

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
DIST_OPT = ("parallel.use_distributed_optimizer=true",)


class Job:
    """A 2-process `torchrun` job; every process of it is killed when the test ends. torchrun
    starts its workers in their own sessions, so "the whole job" is the agent plus its
    children, not a process group."""

    def __init__(self, *overrides: str, env: dict | None = None):
        self.root = Path(next(o for o in overrides if o.startswith("train.save=")).split("=")[1])
        self.root.parent.mkdir(parents=True, exist_ok=True)
        cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "pretrain_rlp.py",
               "--config", "examples/configs/tiny_cpu.yaml", *SMALL, *overrides]
        with open(f"{self.root}.out", "w") as out, open(f"{self.root}.err", "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=out, stderr=err,
                                         env={**os.environ, **(env or {})})
        self.agent = psutil.Process(self.proc.pid)
        JOBS.append(self)

    def workers(self) -> dict[int, psutil.Process]:
        """RANK -> worker process."""
        return {int(p.environ().get("RANK", -1)): p for p in self.agent.children(recursive=True)
                if "pretrain_rlp.py" in " ".join(p.cmdline())}

    def signal(self, sig: int, workers_only: bool = False) -> None:
        procs = list(self.workers().values()) + ([] if workers_only else [self.agent])
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)

    def kill(self) -> None:
        procs = [self.agent] + self.agent.children(recursive=True) if self.proc.poll() is None \
            else []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.proc.wait(60)

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout)

    def wait_for(self, predicate, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"job ended early ({self.proc.returncode}): " + \
                self.text("err")[-2000:]
            assert time.monotonic() < end, "timed out"
            time.sleep(0.05)

    def text(self, kind: str) -> str:
        return Path(f"{self.root}.{kind}").read_text()


JOBS: list[Job] = []


@pytest.fixture(autouse=True)
def _no_orphans():
    yield
    while JOBS:
        JOBS.pop().kill()


def logged_steps(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_resume_and_killed_save_dp2_distributed_optimizer(tmp_path):
    # The reference: 6 steps straight (saving step 3 on the way).
    ref = Job(*DIST_OPT, "train.steps=6", "train.save_interval=3",
              f"train.save={tmp_path / 'ref'}", f"train.metrics_file={tmp_path / 'ref.jsonl'}")
    assert ref.wait() == 0, ref.text("err")[-3000:]
    ref_rows = rows(tmp_path / "ref.jsonl")

    # Resume from step 3; save step 6; get SIGKILLed while writing step 9.
    root, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    job = Job(*DIST_OPT, "train.steps=9", "train.save_interval=3",
              f"train.load={tmp_path / 'ref' / 'step_00000003'}", f"train.save={root}",
              f"train.metrics_file={metrics}", env={"MEGATRON_RLP_FAULTS": "save_stall@9"})
    job.wait_for(lambda: "[fault] save stalled" in job.text("err"))
    job.kill()
    assert "resumed from" in job.text("out") and "at step 3" in job.text("out")
    assert_same_rows(ref_rows[3:], rows(metrics)[:3])  # steps 4-6: resumed == straight
    assert_same_tensors(read_tensors(tmp_path / "ref" / "step_00000006"),
                        read_tensors(root / "step_00000006"))
    assert latest(root).name == "step_00000006"  # the killed save changed nothing
    partial = root / ".tmp_step_00000009"
    assert partial.is_dir() and not (partial / "metadata.json").exists()
    assert any(f.stat().st_size > 0 for f in partial.iterdir())  # part of the data is there

    # The previous checkpoint loads (here on one rank) and the next save clears the debris.
    ok(*DIST_OPT, "train.steps=7", f"train.load={root}", f"train.save={root}")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000006",
                                                      "step_00000007"]


def reshard_and_continue(root: Path, tmp_path: Path, *layout: str) -> None:
    """Load the 2-rank checkpoint on 1 rank, save it there (same global tensors, bit for bit),
    then train one more step from it."""
    step = int(latest(root).name.split("_")[1])
    converted = tmp_path / "one_rank"
    run = ok(f"train.steps={step}", f"train.load={root}", f"train.save={converted}", *layout)
    assert "into a new layout" in run.out, run.out
    assert_same_tensors(read_tensors(latest(root)), read_tensors(latest(converted)))
    run = ok(f"train.steps={step + 1}", f"train.load={converted}", f"train.save={converted}",
             f"train.metrics_file={tmp_path / 'after.jsonl'}", *layout)
    after = rows(tmp_path / "after.jsonl")
    assert [r["step"] for r in after] == [step + 1] and after[0]["skipped"] == 0.0


def test_sigterm_to_the_whole_job_saves_then_tp2_continues_as_tp1(tmp_path):
    """SIGTERM to torchrun and both workers at once (what `scancel` does to a job step)."""
    metrics = tmp_path / "m.jsonl"
    job = Job("parallel.tensor_model_parallel_size=2", "train.steps=100000",
              f"train.save={tmp_path / 'ckpt'}", f"train.metrics_file={metrics}")
    job.wait_for(lambda: logged_steps(metrics) >= 2)
    job.signal(signal.SIGTERM)
    job.wait()  # torchrun re-raises the signal itself (non-zero); the workers stop cleanly
    steps = logged_steps(metrics)
    out, err = job.text("out"), job.text("err")
    assert f"[stop] SIGTERM received after step {steps}" in out, out[-2000:]
    assert latest(job.root).name == f"step_{steps:08d}"
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err, err[-3000:]
    reshard_and_continue(job.root, tmp_path, "parallel.tensor_model_parallel_size=1")


def test_sigusr1_to_one_rank_stops_all_then_pp2_continues_as_pp1(tmp_path):
    metrics = tmp_path / "m.jsonl"
    job = Job("parallel.pipeline_model_parallel_size=2", "train.steps=100000",
              f"train.save={tmp_path / 'ckpt'}", f"train.metrics_file={metrics}")
    job.wait_for(lambda: logged_steps(metrics) >= 2)
    job.workers()[1].send_signal(signal.SIGUSR1)
    assert job.wait() == 0, job.text("err")[-3000:]  # torchrun too: every worker exited 0
    steps = logged_steps(metrics)
    assert f"[stop] SIGUSR1 received after step {steps}" in job.text("out")
    assert latest(job.root).name == f"step_{steps:08d}"
    reshard_and_continue(job.root, tmp_path, "parallel.pipeline_model_parallel_size=1")
