"""Per-step metrics, written by global rank 0: one console line and one JSON line per step,
plus (optional) TensorBoard scalars, Weights & Biases and a progress bar with ETA.

    writer = MetricsWriter.from_config(cfg)   # or MetricsWriter(path, objective, ...)
    writer.log(step, {"loss": ..., "reward_mean": ...})
    writer.close()

Console lines start with `[rlp step N]` / `[ntp step N]` (tools and tests grep them), show the
model TFLOP/s per GPU (rank 0's `flops`, train/flops.py, over the step time), the
process's peak memory (`peak_mem`: CUDA's max allocated on a GPU, the max RSS on CPU; console
only, never in the JSON rows, which resume tests compare) and, with a known step total, end
with `| N/TOTAL eta H:MM:SS`. A step with held-out metrics (`val_*`, train.eval_interval)
also prints `[rlp valid step N] nll_teacher ... | info_gain ...`, whatever log_interval.
On a terminal (stderr is a TTY) a live bar is drawn on stderr and cleared before each console
line. TensorBoard
(`torch.utils.tensorboard`, needs the `tensorboard` package) and W&B (`wandb`; set
`WANDB_MODE=offline` where there is no network, then `wandb sync`) are optional: when the
package is missing or fails to start, a one-line notice is printed and training goes on.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch.distributed as dist

# console column order (absent keys are skipped)
_CONSOLE = (
    ("loss", "loss", "{:+.4f}"), ("reward_mean", "reward", "{:+.4f}"),
    ("reward_std", "r_std", "{:.4f}"), ("advantage_std", "adv_std", "{:.4f}"),
    ("clip_fraction", "clip", "{:.3f}"), ("thought_len", "think_len", "{:.1f}"),
    ("s_ema", "S_ema", "{:.3f}"), ("s_pred", "S_pred", "{:.3f}"),
    ("grad_norm", "gnorm", "{:.3f}"), ("lr", "lr", "{:.2e}"),
    ("routing_agreement", "route_agree", "{:.4f}"), ("moe_expert_load_max", "load_max", "{:.2f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"), ("step_time", "step_s", "{:.2f}"),
)


def _global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _device_peak_tflops() -> float | None:
    """The CUDA card's dense bf16 peak (train/flops.peak_tflops), None off CUDA."""
    import torch

    from megatron_rlp.train.flops import peak_tflops

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return peak_tflops(torch.cuda.get_device_name())


def peak_memory_gib() -> float:
    """Peak memory of this process in GiB: `torch.cuda.max_memory_allocated` when CUDA is in
    use, else the maximum resident set size (`getrusage`, KiB on Linux)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except (ImportError, OSError):
        return float("nan")


def _notice(msg: str) -> None:
    print(f"[metrics] {msg}", file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """H:MM:SS (days as extra hours)."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Steps done of a total, the elapsed time and the ETA at the mean rate since the first
    logged step (so the time to build, load and warm up counts only once)."""

    def __init__(self, total: int, stream: TextIO | None = None, bar: bool | None = None,
                 width: int = 24):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.bar = self.stream.isatty() if bar is None else bar
        self.width = width
        self.start = time.monotonic()  # build/load time counts until the first step
        self.first: tuple[int, float] | None = None
        self.step = 0
        self.eta: float | None = None
        self.drawn = False

    def update(self, step: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = (step, now)
            per_step = now - self.start
        else:
            done = step - self.first[0]
            per_step = (now - self.first[1]) / done if done > 0 else None
        self.step = step
        self.eta = per_step * max(0, self.total - step) if per_step is not None else None

    def suffix(self) -> str:
        eta = "?" if self.eta is None else format_duration(self.eta)
        return f"{self.step}/{self.total} eta {eta}"

    def clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False

    def draw(self, label: str) -> None:
        if not self.bar:
            return
        frac = min(1.0, self.step / self.total) if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = format_duration(time.monotonic() - self.start)
        self.stream.write(f"\r[{label}] [{bar}] {100 * frac:3.0f}% {self.suffix()} "
                          f"(elapsed {elapsed})\x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _open_tensorboard(logdir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _notice(f"train.tensorboard_dir={logdir} but the tensorboard package is not installed "
                "(pip install tensorboard); TensorBoard logging is off")
        return None
    return SummaryWriter(log_dir=logdir, flush_secs=30)


def _open_wandb(project: str, config: dict | None, run_dir: str | None):
    try:
        import wandb
    except ImportError:
        _notice(f"train.wandb_project={project} but wandb is not installed (pip install wandb); "
                "W&B logging is off")
        return None
    try:
        return wandb.init(project=project, config=config, dir=run_dir,
                          name=os.environ.get("WANDB_NAME"))
    except Exception as e:  # no login, no network: never fail a training run over it
        _notice(f"W&B did not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                "); set WANDB_MODE=offline on machines without network. W&B logging is off")
        return None


class MetricsWriter:
    """Prints and appends metrics; a no-op on every rank but global rank 0.

    Args:
        path: JSONL file to append to (None: console only).
        objective: "rlp" or "ntp", the console prefix and the scalar group.
        total_steps: the run's last step, for the ETA (None: no ETA, no bar).
        tensorboard_dir: write TensorBoard scalars there (None: off).
        wandb_project: log to this W&B project (None: off).
        wandb_config: the run's config, stored with the W&B run.
        progress: show the ETA column and, on a terminal, the bar.
    """

    def __init__(self, path: str | None, objective: str, *, total_steps: int | None = None,
                 tensorboard_dir: str | None = None, wandb_project: str | None = None,
                 wandb_config: dict | None = None, progress: bool = True):
        self.rank0 = _global_rank() == 0
        self.objective = objective
        self.file = None
        self.tb = None
        self.wandb = None
        self.progress = None
        if not self.rank0:
            return
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard_dir:
            self.tb = _open_tensorboard(tensorboard_dir)
        if wandb_project:
            run_dir = str(Path(path).parent) if path else None
            self.wandb = _open_wandb(wandb_project, wandb_config, run_dir)
        if progress and total_steps:
            self.progress = Progress(total_steps)

    @classmethod
    def from_config(cls, cfg: Any) -> MetricsWriter:
        """The writer for a RunConfig's `train` section."""
        t = cfg.train
        return cls(t.metrics_file, t.objective, total_steps=t.steps,
                   tensorboard_dir=getattr(t, "tensorboard_dir", None),
                   wandb_project=getattr(t, "wandb_project", None),
                   wandb_config=cfg.to_dict() if hasattr(cfg, "to_dict") else None,
                   progress=getattr(t, "progress", True))

    def log(self, step: int, metrics: dict[str, float], console: bool = True) -> None:
        if not self.rank0:
            return
        if self.progress:
            self.progress.update(step)
        if console:
            cols = [f"{label} {fmt.format(metrics[k])}" for k, label, fmt in _CONSOLE
                    if k in metrics]
            if metrics.get("flops") and metrics.get("step_time"):  # model FLOPs per GPU
                tflops = metrics["flops"] / metrics["step_time"] / 1e12
                cols.append(f"TFLOP/s/GPU {tflops:.3g}")
                peak = _device_peak_tflops()
                if peak:  # MFU against the card's dense bf16 peak (train/flops.py)
                    cols.append(f"MFU {100 * tflops / peak:.1f}%")
            phases = " ".join(f"{k[2:]} {v:.2f}s" for k, v in metrics.items()
                              if k.startswith("t_"))
            line = (f"[{self.objective} step {step:5d}] " + " | ".join(cols)
                    + (f" | {phases}" if phases else "")
                    + f" | peak_mem {peak_memory_gib():.2f} GiB")
            if self.progress:
                self.progress.clear()
                line += f" | {self.progress.suffix()}"
            print(line, flush=True)
        held_out = [(k, v) for k, v in metrics.items() if k.startswith("val_")
                    and k != "val_contexts" and isinstance(v, (int, float))]
        if held_out:
            if self.progress:
                self.progress.clear()
            print(f"[{self.objective} valid step {step:5d}] " + " | ".join(
                f"{k[4:]} {v:+.4f}" if "gain" in k else f"{k[4:]} {v:.4f}"
                for k, v in held_out), flush=True)
        if self.progress:
            self.progress.draw(self.objective)
        if self.file:
            self.file.write(json.dumps({"step": step, "objective": self.objective, **metrics})
                            + "\n")
            self.file.flush()
        scalars = {f"{self.objective}/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
            if console:
                self.tb.flush()
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.progress:
            self.progress.close()
        if self.file:
            self.file.close()
            self.file = None
        if self.tb:
            self.tb.close()
            self.tb = None
        if self.wandb:
            self.wandb.finish()
            self.wandb = None
