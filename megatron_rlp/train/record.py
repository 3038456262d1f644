"""The RLP step's hook: one step's internals, handed to an in-process caller or written to disk.

Two users, one call (`record_step`, at the end of `rlp_step`):
- in process, `rlp_step(..., trace={})` fills the dict with this rank's prompts, windows,
  thoughts, rewards and advantages (tools/bench_rlp.py compares them across paths);
- across processes (tests), `MEGATRON_RLP_RECORD=DIR` (never set in real runs) makes it save,
  on every rank, `DIR/step_{step:06d}_rank{global rank:05d}.pt`.

A saved record is a dict of this rank's contexts and its thoughts, `S_ema`, `S_pred`, rewards
and advantages, plus the rank's (dp, tp, pp) coordinates. Values on tensor/pipeline ranks of
one data-parallel rank are the same (every stage gets the last stage's scores); rows are this
rank's contexts in global-id order, row `b*G + g` is thought g of context b.

The independent reference of a step (tests/helpers/step_reference.py) rebuilds these
numbers from the documents, the thoughts and the saved weights with plain full forwards;
the layout tests compare them across parallel layouts. Without the variable nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from megatron.core import parallel_state

ENV = "MEGATRON_RLP_RECORD"


def record_step(step: int, ro, trace: dict | None = None) -> None:
    """Hand this rank's view of step `step` to `trace` (if given) and save it when
    `MEGATRON_RLP_RECORD` is set; with neither, nothing is done.

    Args:
        ro: the step's `ScoredRollout` (train/rlp_step.py): `contexts` (this rank's) and
            `ids` (their global ids), `prompts` (`PromptBatch`), `windows`, `thoughts`
            (`ThoughtBatch`, [B*G] rows), `s_ema` [B], `rewards` and `advantages` [B*G].
        trace: a dict to receive prompts, windows, thoughts, rewards and advantages.
    """
    if trace is not None:
        trace.update(prompts=ro.prompts, windows=ro.windows, thoughts=ro.thoughts,
                     rewards=ro.rewards, advantages=ro.advantages)
    root = os.environ.get(ENV)
    if not root:
        return
    contexts, prompts, thoughts = ro.contexts, ro.prompts, ro.thoughts
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    record = {
        "step": step,
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "context_ids": torch.tensor(ro.ids, dtype=torch.long),
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
        # None where the teacher did not score the step (`rlp.teacher_scoring`)
        "s_ema": ro.s_ema.detach().clone() if ro.s_ema is not None else None,
        "rewards": ro.rewards.detach().clone(),
        "advantages": ro.advantages.detach().clone(),
    }
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in record.items()},
               path / f"step_{step:06d}_rank{rank:05d}.pt")
