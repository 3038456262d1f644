"""Bad input is refused at start-up, once per job: the failing commands of issue 14 exit 2
with one `error:` line from global rank 0 (the other ranks exit 2 silently), before any
step; the world size comes from torchrun's or srun's variables; a Hugging Face directory
given as `train.load` names the conversion command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rlp.config import ConfigError, launch_env, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "examples/configs/tiny_cpu.yaml"
LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in LAUNCH and not k.startswith("SLURM_")}
    return subprocess.run([sys.executable, "pretrain_rlp.py", "--config", CONFIG, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**clean, "PYTHONPATH": str(ROOT), **env})


ISSUE_COMMANDS = [
    pytest.param(["rlp.group_size=3", "train.micro_batch_size=4", "rlp.contexts_per_step=4"],
                 "train.micro_batch_size=4", id="rlp-6-sequences-per-rank"),
    pytest.param(["train.objective=ntp", "train.micro_batch_size=5"],
                 "train.micro_batch_size=5", id="ntp-16-sequences-per-rank"),
]


@pytest.mark.parametrize("args, key", ISSUE_COMMANDS)
@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_issue_commands_exit_2_with_one_line_from_rank_0(args, key, launcher):
    world = 2 if "rlp.group_size=3" in args else 1
    for rank in range(world):
        if launcher == "torchrun":
            env = dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        else:  # srun: one process per task, SLURM's variables only
            env = dict(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_STEP_ID="0",
                       SLURM_LOCALID=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
        proc = _cli(args, env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""  # no step, no log line
        if rank == 0:
            lines = proc.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: invalid config: "), lines
            assert key in lines[0]
        else:
            assert proc.stderr == "", proc.stderr


def test_launch_env_from_torchrun_srun_or_alone():
    assert launch_env({"WORLD_SIZE": "8", "RANK": "3", "LOCAL_RANK": "1"}) == (8, 3, 1)
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "0",
            "SLURM_LOCALID": "1"}
    assert launch_env(srun) == (16, 5, 1)
    assert launch_env({**srun, "SLURM_STEP_NUM_TASKS": "8"}) == (8, 5, 1)
    assert launch_env({"SLURM_PROCID": "0", "SLURM_NPROCS": "4", "SLURM_STEP_ID": "0"}) == (
        4, 0, 0)
    # the batch script itself (no job step) and torchrun inside srun: not SLURM's tasks
    assert launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == (1, 0, 0)
    assert launch_env({**srun, "WORLD_SIZE": "32", "RANK": "9"}) == (32, 9, 0)
    assert launch_env({}) == (1, 0, 0)


def test_srun_without_rendezvous_address_is_one_line():
    env = dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_STEP_ID="0")
    proc = _cli(["rlp.contexts_per_step=8"], env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "MASTER_ADDR and MASTER_PORT" in proc.stderr


def test_hf_directory_as_train_load_names_the_conversion(tmp_path):
    hf = tmp_path / "Qwen3-0.6B"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        load_config(None, (f"train.load={hf}",))
    msg = str(err.value)
    assert "\n" not in msg and f"train.load='{hf}'" in msg
    assert (f"python tools/convert_checkpoint.py hf-to-megatron --hf-dir {hf} --out "
            f"{hf}-megatron" in msg and f"train.load={hf}-megatron" in msg)


def test_hf_like_directory_at_load_time_names_the_conversion(tmp_path):
    """A directory with config.json but no weights passes start-up (it may be neither); the
    loader's refusal names the conversion too."""
    from megatron_rlp.checkpoint import CheckpointError, resolve_checkpoint

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="convert it first with `python "
                       "tools/convert_checkpoint.py hf-to-megatron"):
        resolve_checkpoint(str(tmp_path))


@pytest.mark.parametrize("env, how", [
    ({}, {"rank": 0, "world_size": 1}),  # alone: a private tcp:// rendezvous
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     {"init_method": "env://", "rank": 1, "world_size": 2}),  # srun: SLURM's rank and size
])
def test_process_group_timeout_is_distributed_timeout_minutes(monkeypatch, env, how):
    """`train.distributed_timeout_minutes` (Megatron's name and default, 10) is the timeout
    of the default group and of Megatron's groups."""
    import datetime

    from megatron_rlp import distributed

    for key in (*LAUNCH, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen = {}
    monkeypatch.setattr(distributed, "setup_device", lambda cfg: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda **kw: seen.setdefault("init", kw))
    monkeypatch.setattr(distributed.parallel_state, "initialize_model_parallel",
                        lambda **kw: seen.setdefault("megatron", kw))
    monkeypatch.setattr(distributed.tensor_parallel, "model_parallel_cuda_manual_seed",
                        lambda seed: None)
    assert load_config().train.distributed_timeout_minutes == 10
    distributed.initialize(load_config(None, ("train.distributed_timeout_minutes=0.5",)))
    assert seen["init"]["timeout"] == datetime.timedelta(seconds=30)
    assert seen["megatron"]["distributed_timeout_minutes"] == 0.5
    assert {k: seen["init"][k] for k in how} == how


def test_check_world_size_validates_without_a_launcher():
    """torchrun adds its own report when a worker exits 2; `--check-world-size N` gives the
    one line (or 'valid') from one process."""
    bad = _cli(["--check-world-size", "2", "rlp.group_size=3", "train.micro_batch_size=4",
                "rlp.contexts_per_step=4"], {})
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "train.micro_batch_size=4" in bad.stderr
    good = _cli(["--check-world-size", "2"], {})
    assert good.returncode == 0 and good.stdout.strip() == "config valid for 2 rank(s)"


@pytest.mark.parametrize("override, expected", [
    ("train.distributed_timeout_minutes=0", "train.distributed_timeout_minutes=0.0"),
    ("train.distributed_timeout_minutes=inf", "train.distributed_timeout_minutes=inf"),
    ("train.watchdog_minutes=-1", "train.watchdog_minutes=-1.0"),
    ("train.finetune=true", "train.finetune=True"),  # without train.load
])
def test_new_train_keys_are_validated(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, (override,))
    assert expected in str(err.value) and "\n" not in str(err.value)
