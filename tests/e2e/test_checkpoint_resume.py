"""Checkpoints on one rank, through `pretrain_rlp.main` in this process (the CLI code path
without the interpreter start-up): what a checkpoint holds, exact resume, keep-last,
non-finite steps, the wall-time limit, and the RNG round trip.

Exactness: a resumed run must reproduce the uninterrupted run bit for bit — every per-step
metric except timings, and every tensor of the final checkpoint (policy, EMA teacher,
Adam moments) compared with `torch.equal`.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from helpers.checkpoint_helpers import (
    CONFIG,
    SMALL,
    assert_same_rows,
    assert_same_tensors,
    in_process,
    latest,
    main,
    ok,
    read_tensors,
    rows,
)
from torch.distributed.checkpoint import FileSystemReader

DIST_OPT = ("parallel.use_distributed_optimizer=true",)


@pytest.mark.parametrize("objective, extra", [
    pytest.param("rlp", (), id="rlp"),
    pytest.param("ntp", (), id="ntp"),
    pytest.param("rlp", DIST_OPT, id="rlp-distopt-dp_reshardable"),
    pytest.param("rlp", (*DIST_OPT, "train.dist_optimizer_checkpoint=fully_reshardable"),
                 id="rlp-distopt-fully_reshardable"),
])
def test_resume_is_bit_exact(tmp_path, objective, extra):
    """6 steps straight == 3 steps, clean exit (train.exit_interval), resume, 3 more steps."""
    common = (f"train.objective={objective}", "train.steps=6", *extra)
    ok(*common, f"train.save={tmp_path / 'a'}", f"train.metrics_file={tmp_path / 'a.jsonl'}")
    first = ok(*common, "train.exit_interval=3", f"train.save={tmp_path / 'b'}",
               f"train.metrics_file={tmp_path / 'b.jsonl'}")
    assert "[stop] train.exit_interval=3 reached after step 3" in first.out
    assert latest(tmp_path / "b").name == "step_00000003"
    second = ok(*common, f"train.load={tmp_path / 'b'}", f"train.save={tmp_path / 'b'}",
                f"train.metrics_file={tmp_path / 'b.jsonl'}")
    assert "[load] resumed from" in second.out and "at step 3" in second.out
    assert_same_rows(rows(tmp_path / "a.jsonl"), rows(tmp_path / "b.jsonl"))
    a, b = read_tensors(latest(tmp_path / "a")), read_tensors(latest(tmp_path / "b"))
    prefixes = {k.split(".")[0] for k in a}
    assert prefixes == ({"model", "optimizer", "ema"} if objective == "rlp"
                        else {"model", "optimizer"})
    assert_same_tensors(a, b)


def test_save_before_any_update_resumes(tmp_path):
    """Step 0 (no Adam state yet; the distributed optimizer cannot even describe it)."""
    ok(*DIST_OPT, "train.steps=0", f"train.save={tmp_path}")
    assert latest(tmp_path).name == "step_00000000"
    run = ok(*DIST_OPT, "train.steps=1", f"train.load={tmp_path}", f"train.save={tmp_path}")
    assert "resumed" in run.out and latest(tmp_path).name == "step_00000001"


def test_checkpoint_holds_the_whole_run(tmp_path):
    from megatron.core import dist_checkpointing

    ok("train.steps=4", "train.save_interval=1", "train.keep_last=2", f"train.save={tmp_path}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003",
                                                          "step_00000004"]
    ckpt = latest(tmp_path)
    assert (ckpt / "integrity.json").is_file() and (ckpt / "metadata.json").is_file()
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    assert common["step"] == 4 and common["consumed_tokens"] > 0
    assert common["objective"] == "rlp" and common["teacher_initialized"]
    assert common["scheduler"]["num_steps"] == 4
    assert common["config"]["model"]["hidden_size"] == 64
    assert common["config"]["train"]["keep_last"] == 2
    assert common["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert common["counters"] == {"skipped_total": 0, "skipped_in_a_row": 0}
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata.keys()
    assert any(k.startswith("rng_state") for k in keys), sorted(keys)[:5]
    tensors = read_tensors(ckpt)
    assert all(v.dtype == torch.float32 for k, v in tensors.items() if k.startswith("ema."))


def test_keep_last_only_prunes_earlier_steps(tmp_path):
    """A fresh run into a directory of another run: warned, and that run's later checkpoints
    are not pruned away by this run's keep_last."""
    ok("train.steps=3", "train.save_interval=1", "train.keep_last=2", f"train.save={tmp_path}")
    run = ok("train.steps=1", "train.keep_last=2", f"train.save={tmp_path}")
    assert "[warn] train.save=" in run.out and "latest: step_00000003" in run.out
    assert latest(tmp_path).name == "step_00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step_00000001", "step_00000002", "step_00000003"]


def test_rng_states_round_trip(tmp_path):
    """Every RNG the checkpoint holds comes back exactly (in-process, so they can be read)."""
    from megatron.core import tensor_parallel

    from megatron_rlp import distributed
    from megatron_rlp.checkpoint import load_checkpoint, save_checkpoint
    from megatron_rlp.config import load_config
    from megatron_rlp.train.builder import build_state

    with in_process():
        cfg = load_config(CONFIG, SMALL, world_size=1)
        distributed.initialize(cfg)
        try:
            state = build_state(cfg)
            random.random(), np.random.rand(), torch.rand(3)  # noqa: B018 - move them all
            tracker = tensor_parallel.get_cuda_rng_tracker()
            with tracker.fork():
                torch.rand(5)
            before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state(),
                      {k: v.clone() for k, v in tracker.get_states().items()})
            save_checkpoint(state, str(tmp_path))
            random.random(), np.random.rand(), torch.rand(3)  # noqa: B018
            with tracker.fork():
                torch.rand(5)
            assert not torch.equal(torch.get_rng_state(), before[2])
            load_checkpoint(state, str(tmp_path))
            assert random.getstate() == before[0]
            assert np.array_equal(np.random.get_state()[1], before[1])
            assert torch.equal(torch.get_rng_state(), before[2])
            after = tracker.get_states()
            assert after.keys() == before[3].keys()
            assert all(torch.equal(after[k], before[3][k]) for k in after)
        finally:
            distributed.shutdown()


def test_nonfinite_step_changes_nothing(tmp_path):
    """A NaN gradient at step 2 (on the last rank) skips the update: the state after step 2
    equals the state after step 1 in every tensor; the step is logged as skipped."""
    run = ok("train.steps=3", "train.save_interval=1", "train.exit_interval=2",
             f"train.save={tmp_path}", f"train.metrics_file={tmp_path / 'm.jsonl'}",
             faults="nan_grad@2")
    assert "[skip] step 2: non-finite loss or gradient, update skipped" in run.out
    m = rows(tmp_path / "m.jsonl")
    assert [r["skipped"] for r in m] == [0.0, 1.0] and math.isnan(m[1]["grad_norm"])
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000001",
                                                               "step_00000002"]
    assert_same_tensors(read_tensors(tmp_path / "step_00000001"),
                        read_tensors(tmp_path / "step_00000002"))
    # ... and the run goes on from there: step 3 updates again.
    ok("train.steps=3", f"train.load={tmp_path}", f"train.save={tmp_path}",
       f"train.metrics_file={tmp_path / 'm.jsonl'}")
    assert rows(tmp_path / "m.jsonl")[-1]["skipped"] == 0.0


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    run = main("train.steps=8", "train.save_interval=2", "train.max_consecutive_skips=3",
               f"train.save={tmp_path}", faults="nan_grad@3,nan_grad@4,nan_grad@5")
    assert run.rc == 1
    err = run.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in run.err, run.err
    assert "3 consecutive steps with a non-finite loss or gradient (steps 3-5" in err[0]
    assert "the last good checkpoint is" in err[0] and "step_00000002" in err[0]
    assert latest(tmp_path).name == "step_00000002"  # step 4 was skipped: not saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]
    resumed = ok("train.steps=3", f"train.load={tmp_path}")
    assert "resumed" in resumed.out


def test_wall_time_limit_saves_and_exits_zero(tmp_path, monkeypatch):
    import megatron_rlp.train.signals as signals

    clock = {"start": None}

    def start():  # count from the start of this run, not of the pytest process
        import time

        clock["start"] = time.time()
        return clock["start"]

    monkeypatch.setattr(signals, "_process_start", start)
    run = ok("train.steps=100000", "train.wall_time_limit_minutes=0.01",
             f"train.save={tmp_path}", f"train.metrics_file={tmp_path / 'm.jsonl'}")
    last = rows(tmp_path / "m.jsonl")[-1]["step"]
    assert 1 <= last < 100000
    assert f"[stop] wall-time limit of 0.01 min reached after step {last}" in run.out
    assert latest(tmp_path).name == f"step_{last:08d}"
