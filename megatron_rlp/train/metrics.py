"""Per-step metrics: one console line and one JSON line per step, written by global rank 0."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

# console column order (absent keys are skipped)
_CONSOLE = (
    ("loss", "loss", "{:+.4f}"), ("reward_mean", "reward", "{:+.4f}"),
    ("reward_std", "r_std", "{:.4f}"), ("advantage_std", "adv_std", "{:.4f}"),
    ("clip_fraction", "clip", "{:.3f}"), ("thought_len", "think_len", "{:.1f}"),
    ("s_ema", "S_ema", "{:.3f}"), ("s_pred", "S_pred", "{:.3f}"),
    ("grad_norm", "gnorm", "{:.3f}"), ("lr", "lr", "{:.2e}"),
    ("tokens_per_s", "tok/s", "{:.0f}"), ("step_time", "step_s", "{:.2f}"),
)


class MetricsWriter:
    """Prints and appends metrics; a no-op on every rank but global rank 0."""

    def __init__(self, path: str | None, objective: str):
        self.rank0 = dist.get_rank() == 0
        self.objective = objective
        self.file = None
        if self.rank0 and path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def log(self, step: int, metrics: dict[str, float], console: bool = True) -> None:
        if not self.rank0:
            return
        if console:
            cols = [f"{label} {fmt.format(metrics[k])}" for k, label, fmt in _CONSOLE
                    if k in metrics]
            phases = " ".join(f"{k[2:]} {v:.2f}s" for k, v in metrics.items()
                              if k.startswith("t_"))
            print(f"[{self.objective} step {step:5d}] " + " | ".join(cols)
                  + (f" | {phases}" if phases else ""), flush=True)
        if self.file:
            self.file.write(json.dumps({"step": step, "objective": self.objective, **metrics})
                            + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
