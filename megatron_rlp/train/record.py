"""Test hook: write one RLP step's internals to disk, so tests can check them from outside.

`MEGATRON_RLP_RECORD=DIR` (never set in real runs) makes `rlp_step` save, on every rank,
`DIR/step_{step:06d}_rank{global rank:05d}.pt`: a dict of this rank's contexts and its
thoughts, `S_ema`, `S_pred`, rewards and advantages, plus the rank's (dp, tp, pp) coordinates.
Values on tensor/pipeline ranks of one data-parallel rank are the same (every stage gets the
last stage's scores); rows are this rank's contexts in global-id order, row `b*G + g` is
thought g of context b.

The independent reference of a step (tests/reference_step.py) rebuilds these numbers from the
documents, the thoughts and the saved weights with plain full forwards; the layout tests
compare them across parallel layouts. Without the variable nothing is written or computed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from megatron.core import parallel_state

ENV = "MEGATRON_RLP_RECORD"


def record_step(step: int, contexts, context_ids: list[int], prompts, thoughts,
                s_ema: torch.Tensor, rewards: torch.Tensor, advantages: torch.Tensor) -> None:
    """Save this rank's view of step `step` when `MEGATRON_RLP_RECORD` is set (else no-op).

    Args:
        contexts: this rank's `Context`s; context_ids: their global ids.
        prompts: the step's `PromptBatch`; thoughts: its `ThoughtBatch` ([B*G] rows).
        s_ema: [B]; rewards, advantages: [B*G].
    """
    root = os.environ.get(ENV)
    if not root:
        return
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    record = {
        "step": step,
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "context_ids": torch.tensor(context_ids, dtype=torch.long),
        "doc_index": torch.tensor([c.doc_index for c in contexts], dtype=torch.long),
        "position": torch.tensor([c.position for c in contexts], dtype=torch.long),
        "target": torch.tensor([c.target for c in contexts], dtype=torch.long),
        "prefixes": [prompts.tokens[i, prompts.tokens.shape[1] - int(n):].clone()
                     for i, n in enumerate(prompts.lengths)],
        "thought_tokens": thoughts.tokens.clone(),
        "thought_mask": thoughts.mask.clone(),
        "thought_logprobs": thoughts.logprobs.clone(),
        "closed": thoughts.closed.clone(),
        "s_pred": thoughts.s_pred.clone(),
        "s_ema": s_ema.detach().clone(),
        "rewards": rewards.detach().clone(),
        "advantages": advantages.detach().clone(),
    }
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in record.items()},
               path / f"step_{step:06d}_rank{rank:05d}.pt")
