"""`rlp.ntp_loss_coef`: a next-token loss mixed into the RLP step (RLP.md: "Mixing an NTP loss
with a weight is an optional extension"; default 0 = off, nothing below runs).

The NTP term is the policy's own next-token cross-entropy over the step's raw document
windows (`data.batches.DocumentWindows`, what the EMA teacher reads: no template, no
thoughts), token-mean over this rank's window tokens:

    loss = L_RLP + ntp_loss_coef * mean_{rows, t} CE(x_{t+1} | x_<=t)

It runs as its own forward/backward pass through Megatron's schedule (one micro-batch of
all the rank's windows) before the RLP micro-batches, with `finalize_model_grads` held back
so its gradients stay in DDP's buffers and are reduced once, with the RLP gradients, by the
RLP pass's finalize (`train.update.optimizer_update(extra_passes=...)`). Every reduction
there is linear, so the step's gradient is exactly grad L_RLP + coef * grad L_NTP. A
separate pass (rather than extra rows in the RLP micro-batches) keeps the RLP micro-batches
and their pipeline shapes unchanged; the cost is one more forward/backward over windows the
teacher already reads. Megatron's per-token loss (`model(..., labels=)`, the loss of
`train.objective=ntp`) over the padded vocabulary, as the plain NTP step computes it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from megatron_rlp.models.masks import padded_causal_mask
from megatron_rlp.utils import ceil_to


def ntp_window_batch(tokens: Tensor, valid: Tensor, multiple: int = 1) -> dict[str, Tensor]:
    """Left-padded windows -> one NTP micro-batch.

    Args:
        tokens, valid: [D, W] left-padded windows (`DocumentWindows.tokens/valid`).
        multiple: width multiple (the TP size under sequence parallel, FP8 alignment).

    Returns:
        tokens, positions, labels: [D, S] long; valid, loss_mask: [D, S] bool (S = W rounded
        up to `multiple`); label t is token t + 1, counted where both are real tokens.
    """
    d, w = tokens.shape
    s = ceil_to(w, multiple)
    out = tokens.new_full((d, s), 0)
    ok = valid.new_zeros((d, s))
    out[:, :w], ok[:, :w] = tokens, valid
    labels = torch.zeros_like(out)
    labels[:, :w - 1] = tokens[:, 1:]
    loss_mask = torch.zeros_like(ok)
    loss_mask[:, :w - 1] = valid[:, :-1] & valid[:, 1:]
    positions = torch.arange(s, device=tokens.device).expand(d, -1)
    return dict(tokens=out, positions=positions, labels=labels, valid=ok, loss_mask=loss_mask)


def _loss(batch: dict[str, Tensor], coef: float, sink: list, per_token: Tensor):
    mask = batch["loss_mask"].float()
    ce = (per_token.float() * mask).sum() / mask.sum().clamp(min=1)
    sink.append(ce.detach())
    return coef * ce, {"ntp_loss": ce.detach()}


def ntp_forward_step(coef: float, sink: list, data_iterator, model):
    """Megatron `forward_step_func` of the NTP pass; the token-mean CE of each micro-batch
    goes to `sink` (last pipeline stage)."""
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["positions"], padded_causal_mask(batch["valid"]),
                labels=batch["labels"])
    return out, partial(_loss, batch, coef, sink)


def ntp_pass(windows, coef: float, multiple: int, sink: list):
    """The `extra_passes` entry for `optimizer_update`: (micro-batches, forward step, width)."""
    batch = ntp_window_batch(windows.tokens, windows.valid, multiple)
    return [batch], partial(ntp_forward_step, coef, sink), batch["tokens"].shape[1]
