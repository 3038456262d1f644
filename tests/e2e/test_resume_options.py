"""Resume options as Megatron-LM has them (train/resume.py): a new lr / weight decay on a
same-objective resume trains on with the Adam state carried over (issue 14, point 6), and
`train.finetune`, `train.load_optimizer`, `train.load_rng`, `train.override_scheduler`."""

from __future__ import annotations

import random

import pytest
import torch
from helpers.checkpoint_helpers import CONFIG, SMALL, in_process, latest, ok, read_tensors, rows

DIST_OPT = ("parallel.use_distributed_optimizer=true",)
NTP = ("train.objective=ntp", "optimizer.lr=1e-2")


def _optimizer_tensors(ckpt) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_tensors(ckpt).items() if k.startswith("optimizer")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """2 NTP steps at lr 1e-2, with the local and the distributed optimizer."""
    root = tmp_path_factory.mktemp("resume")
    for name, extra in (("local", ()), ("dist", DIST_OPT)):
        ok(*NTP, *extra, "train.steps=2", f"train.save={root / name}")
    return root


@pytest.mark.parametrize("kind, extra", [("local", ()), ("dist", DIST_OPT)])
@pytest.mark.parametrize("change", [("optimizer.lr=3e-3",), ("optimizer.weight_decay=0.0",),
                                    ("optimizer.lr=3e-3", "optimizer.lr_decay_style=cosine",
                                     "optimizer.min_lr=1e-4")])
def test_changed_hyperparameters_resume_with_the_adam_state(saved, tmp_path, kind, extra,
                                                           change):
    """Megatron pairs parameter groups by their lr: unpatched, any lr change failed with
    `Could not find parameter group with key (None, 0.003, ...)`. Now the Adam moments come
    back unchanged (saved again before any step: bitwise equal) and the new values apply."""
    source = saved / kind
    run = ok(*NTP, *extra, *change, "train.steps=2", f"train.load={source}",
             f"train.save={tmp_path / 'same'}")
    assert "[load] resumed" in run.out and "at step 2" in run.out
    a, b = _optimizer_tensors(latest(source)), _optimizer_tensors(latest(tmp_path / "same"))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), "Adam state changed on load"
    # and it trains on, under the new schedule
    ok(*NTP, *extra, *change, "train.steps=3", f"train.load={source}",
       f"train.metrics_file={tmp_path / 'm.jsonl'}")
    row = rows(tmp_path / "m.jsonl")[-1]
    assert row["step"] == 3 and not row["skipped"]
    lr = {"optimizer.lr=3e-3": 3e-3}.get(change[0], 1e-2)
    if "optimizer.lr_decay_style=cosine" in change:  # step 3 of 3: decayed to min_lr
        lr = 1e-4
    assert row["lr"] == pytest.approx(lr)


def test_override_scheduler_false_keeps_the_checkpoint_schedule(saved, tmp_path):
    ok(*NTP, "optimizer.lr=3e-3", "train.override_scheduler=false", "train.steps=3",
       f"train.load={saved / 'local'}", f"train.metrics_file={tmp_path / 'm.jsonl'}")
    assert rows(tmp_path / "m.jsonl")[-1]["lr"] == pytest.approx(1e-2)


def test_load_optimizer_false_starts_adam_afresh(saved, tmp_path):
    run = ok(*NTP, "train.load_optimizer=false", "train.steps=2",
             f"train.load={saved / 'local'}", f"train.save={tmp_path}")
    assert "[load] resumed" in run.out and "at step 2" in run.out
    assert not _optimizer_tensors(latest(tmp_path))  # no Adam state until the next step
    assert latest(tmp_path).name == "step_00000002"


def test_finetune_loads_weights_only_from_step_0(saved, tmp_path):
    run = ok(*NTP, "train.finetune=true", "train.steps=1", f"train.load={saved / 'local'}",
             f"train.save={tmp_path}")
    assert "fine-tuning from the policy weights" in run.out and "at step 0" in run.out
    assert latest(tmp_path).name == "step_00000001"
    model_a = {k: v for k, v in read_tensors(latest(saved / "local")).items()
               if k.startswith("model")}
    assert model_a  # the step moved the weights it started from: compare with a fresh start
    fresh = tmp_path / "fresh"
    ok(*NTP, "train.steps=1", f"train.save={fresh}")
    tuned, scratch = read_tensors(latest(tmp_path)), read_tensors(latest(fresh))
    assert any(not torch.equal(tuned[k], scratch[k]) for k in model_a)


def test_load_rng_false_keeps_the_seeded_states(tmp_path):
    """In process, so the RNGs can be read: restored by default, untouched when off."""
    from megatron_rlp import distributed
    from megatron_rlp.checkpoint import load_checkpoint, save_checkpoint
    from megatron_rlp.config import load_config
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.resume import ResumeOptions

    with in_process():
        cfg = load_config(CONFIG, SMALL, world_size=1)
        distributed.initialize(cfg)
        try:
            state = build_state(cfg)
            saved = (random.getstate(), torch.get_rng_state())
            save_checkpoint(state, str(tmp_path))
            random.random(), torch.rand(3)  # noqa: B018 - move them
            moved = (random.getstate(), torch.get_rng_state())
            load_checkpoint(state, str(tmp_path), options=ResumeOptions(load_rng=False))
            assert random.getstate() == moved[0]
            assert torch.equal(torch.get_rng_state(), moved[1])
            load_checkpoint(state, str(tmp_path))
            assert random.getstate() == saved[0]
            assert torch.equal(torch.get_rng_state(), saved[1])
        finally:
            distributed.shutdown()


@pytest.mark.parametrize("exists", [False, True])
def test_save_x_load_x_starts_from_scratch_then_resumes(tmp_path, exists):
    """Megatron-LM's `--save X --load X` (train.save = train.load): a missing or empty X (or
    one holding only logs) is the first job of a series, which starts from scratch with one
    line; the next job resumes from X. A train.load elsewhere that holds nothing is still
    refused."""
    from helpers.checkpoint_helpers import main

    x = tmp_path / "x"
    if exists:
        x.mkdir()
        (x / "metrics.jsonl").write_text("")
    run = ok(*NTP, "train.steps=2", f"train.save={x}", f"train.load={x}")
    assert f"[load] no checkpoint in {x}: starting from scratch" in run.out, run.out
    assert "[ntp step     2]" in run.out and (x / "latest").is_file()
    assert "TFLOP/s/GPU " in run.out and " | peak_mem " in run.out  # issue 25, item 9
    again = ok(*NTP, "train.steps=3", f"train.save={x}", f"train.load={x}")
    assert "[load] resumed from" in again.out and "[ntp step     3]" in again.out, again.out
    assert "[ntp step     1]" not in again.out
    other = main(*NTP, "train.steps=2", f"train.save={tmp_path / 'y'}",
                 f"train.load={tmp_path / 'empty'}")
    assert other.rc == 2 and "train.load=" in other.err, other.err
