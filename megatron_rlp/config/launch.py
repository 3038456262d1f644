"""Where this process stands in its job (world size, global and local rank), read from the
launcher's environment before torch.distributed starts."""

from __future__ import annotations

import os
import typing


def launch_env(env: typing.Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(world size, global rank, local rank) of this process, from its launcher.

    torchrun sets WORLD_SIZE / RANK / LOCAL_RANK. `srun` starting one process per task sets
    SLURM_STEP_NUM_TASKS (or SLURM_NTASKS / SLURM_NPROCS) / SLURM_PROCID / SLURM_LOCALID; those
    count only inside a job step (SLURM_STEP_ID), not in the batch script itself. Otherwise
    the process is alone: (1, 0, 0).
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "RANK" in env:
        return (int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0")),
                int(env.get("LOCAL_RANK", "0")))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        for key in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"):
            if env.get(key, "").isdigit():
                return int(env[key]), int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0"))
    return 1, 0, 0
