"""Plain next-token pretraining on the same loop: warm-up, and the compute-matched baseline."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_rlp.data import NTPBatcher
from megatron_rlp.data.batches import split_microbatches
from megatron_rlp.train.builder import TrainState
from megatron_rlp.train.reduce import mean_data_parallel, share_last_stage_values
from megatron_rlp.train.timers import PhaseTimer
from megatron_rlp.train.update import optimizer_update


def _loss(logits_or_loss: torch.Tensor):
    """Megatron returns per-token losses [b, s] when labels are given."""
    loss = logits_or_loss.float().mean()
    return loss, {"loss": loss.detach()}

def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["positions"], None, labels=batch["labels"])
    return out, _loss

def ntp_step(state: TrainState, batcher: NTPBatcher, timer: PhaseTimer) -> dict[str, float]:
    """Run NTP step `state.step + 1` over this rank's slice of the global batch."""
    cfg, step = state.cfg, state.step + 1
    with timer("update"):
        windows = torch.from_numpy(batcher.batch(step, cfg.data.ntp_batch_size))
        dp, rank = (parallel_state.get_data_parallel_world_size(),
                    parallel_state.get_data_parallel_rank())
        local = windows.chunk(dp)[rank]
        s = local.shape[1] - 1
        batch = dict(tokens=local[:, :-1], labels=local[:, 1:],
                     positions=torch.arange(s).expand(local.shape[0], -1))
        batch = {k: v.to(state.device) for k, v in batch.items()}
        mbs = split_microbatches(batch, cfg.train.micro_batch_size)
        losses, grad_norm, applied = optimizer_update(state, mbs, _forward_step, s)
        state.step = step  # consumed even when the update was skipped (keyed by the step)
    loss = float(torch.stack([d["loss"] for d in losses]).mean()) if losses else 0.0
    loss = share_last_stage_values({"loss": loss}, ("loss",))["loss"]
    tokens = float(windows.shape[0] * s)
    state.consumed_tokens += int(tokens)
    return {"loss": mean_data_parallel(loss), "grad_norm": grad_norm, "tokens": tokens,
            "skipped": float(not applied)}
