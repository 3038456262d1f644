"""`rlp.teacher_scoring` across checkpoints (one rank, pretrain_rlp.main in process): `off`
saves no EMA teacher and logs no reward level; resuming across settings is handled and said
in the one `[load]` line (the update never depended on S_ema: test_teacher_cancellation.py)."""

from __future__ import annotations

from helpers.checkpoint_helpers import latest, ok, read_tensors, rows


def test_off_saves_no_teacher_and_resumes_either_way(tmp_path):
    off, on = tmp_path / "off", tmp_path / "on"
    run = ok("train.steps=2", f"train.save={off}", "rlp.teacher_scoring=off",
             f"train.metrics_file={off}/metrics.jsonl")
    tensors = read_tensors(latest(off))
    assert not any(k.startswith("ema.") for k in tensors)
    assert any(k.startswith("model.") for k in tensors)
    logged = rows(off / "metrics.jsonl")
    assert [r["teacher_scored"] for r in logged] == [0.0, 0.0]
    assert all("reward_mean" not in r and "s_ema" not in r for r in logged)
    assert all("advantage_std" in r for r in logged)

    # off -> every_step: no teacher in the checkpoint, it restarts from the policy
    run = ok("train.steps=3", f"train.save={off}", f"train.load={off}")
    load = [line for line in run.out.splitlines() if line.startswith("[load]")]
    assert len(load) == 1 and "holds no EMA teacher" in load[0], run.out
    assert any(k.startswith("ema.") for k in read_tensors(latest(off)))

    # every_step -> off: the saved teacher is left out
    ok("train.steps=2", f"train.save={on}")
    assert any(k.startswith("ema.") for k in read_tensors(latest(on)))
    run = ok("train.steps=3", f"train.save={on}", f"train.load={on}",
             "rlp.teacher_scoring=off")
    load = [line for line in run.out.splitlines() if line.startswith("[load]")]
    assert len(load) == 1 and "EMA teacher is not loaded" in load[0], run.out
    assert not any(k.startswith("ema.") for k in read_tensors(latest(on)))
