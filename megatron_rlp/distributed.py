"""Process groups and seeds: torch.distributed (gloo on CPU, nccl on GPU) and Megatron TP/PP/DP."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

from megatron_rlp.config import RunConfig, launch_env


def torch_device(cfg: RunConfig) -> torch.device:
    """The one device this rank's model, teacher, caches and batches live on: `cpu`, or
    `cuda:LOCAL_RANK` for `device.type=cuda` (the launcher's local rank, `config.launch_env`;
    0 for a plain run)."""
    if cfg.device.type == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", launch_env()[2])


def setup_device(cfg: RunConfig) -> None:
    """Select the backend before any Megatron object exists."""
    if cfg.device.type == "cpu":
        from megatron_rlp.backends import cpu

        cpu.activate()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE",
                                                                      "1").split("(")[0]))
        threads = cfg.device.num_threads or max(1, (os.cpu_count() or 1) // local)
        torch.set_num_threads(threads)
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("device.type=cuda but no CUDA device is visible (use device=cpu)")
        torch.cuda.set_device(torch_device(cfg))


def initialize(cfg: RunConfig) -> None:
    """Start torch.distributed (env:// from torchrun or srun, or a 1-process group) and
    Megatron's TP/PP/DP groups, then seed Megatron's RNG tracker.

    Every collective waits at most `train.distributed_timeout_minutes` (Megatron-LM's
    --distributed-timeout-minutes, default 10), Megatron's groups included."""
    setup_device(cfg)
    if not dist.is_initialized():
        # torchrun sets env:// variables; srun sets SLURM ones (rank and size passed here,
        # MASTER_ADDR/PORT checked at start-up); a plain `python` run is a group of one, set
        # up without touching os.environ (children must not inherit a stale rendezvous).
        world, rank, _ = launch_env()
        if "RANK" in os.environ:
            how = {}
        elif world > 1:
            how = dict(init_method="env://", rank=rank, world_size=world)
        else:
            how = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        dist.init_process_group(
            backend="gloo" if cfg.device.type == "cpu" else "nccl",
            timeout=datetime.timedelta(minutes=cfg.train.distributed_timeout_minutes),
            **how,
        )
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        distributed_timeout_minutes=cfg.train.distributed_timeout_minutes,  # float is fine
    )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)


def shutdown() -> None:
    # Megatron's process-global MoE loss tracker is sized by the model's layer count.
    destroy_moe_metrics_tracker()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
