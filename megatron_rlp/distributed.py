"""Process groups and seeds: torch.distributed (gloo on CPU, nccl on GPU) and Megatron TP/PP/DP."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_rlp.config import RunConfig


def torch_device(cfg: RunConfig) -> torch.device:
    """The one device this rank's model, teacher, caches and batches live on: `cpu`, or
    `cuda:LOCAL_RANK` for `device.type=cuda` (torchrun's local rank; 0 for a plain run)."""
    if cfg.device.type == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def setup_device(cfg: RunConfig) -> None:
    """Select the backend before any Megatron object exists."""
    if cfg.device.type == "cpu":
        from megatron_rlp.backends import cpu

        cpu.activate()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = cfg.device.num_threads or max(1, (os.cpu_count() or 1) // local)
        torch.set_num_threads(threads)
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("device.type=cuda but no CUDA device is visible (use device=cpu)")
        torch.cuda.set_device(torch_device(cfg))


def initialize(cfg: RunConfig) -> None:
    """Start torch.distributed (env:// from torchrun, or a 1-process group) and Megatron's
    TP/PP/DP groups, then seed Megatron's RNG tracker."""
    setup_device(cfg)
    if not dist.is_initialized():
        # torchrun sets env:// variables; a plain `python` run is a group of one, set up
        # without touching os.environ (child processes must not inherit a stale rendezvous).
        alone = {} if "RANK" in os.environ else dict(
            init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        dist.init_process_group(
            backend="gloo" if cfg.device.type == "cpu" else "nccl",
            timeout=datetime.timedelta(minutes=10),
            **alone,
        )
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
