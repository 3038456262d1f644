"""The no-think baseline pbar_phi: an fp32 EMA copy of the policy, sharded like it.

RLP.md: lazily initialised phi <- theta on the first step; after every optimizer step
phi <- tau*phi + (1-tau)*theta. It is a full model instance of this rank's shard (same
TP/PP layout, built by the same provider), so it can run forwards itself and its
`sharded_state_dict` checkpoints exactly like the policy's. fp32 always: with tau=0.999 a
bf16 shadow would round most updates away.

Precision: the teacher is built from its own fp32 `TransformerConfig` (the provider's
`params_dtype="fp32"`), not the policy's config cast with `.float()`. Megatron derives
dtypes from the config, not the weights: attention casts its softmax to bf16 when
`config.bf16`, the Mamba layer casts its input to `config.params_dtype` before `in_proj`,
and pipeline stages receive `config.pipeline_dtype` buffers; with a bf16 config and fp32
weights each of those breaks (mixed-dtype matmuls, fp32 sends into bf16 receives). The
alternative, scoring in bf16 from the fp32 shadow, needs a second (bf16) copy of the
teacher refreshed after every EMA update. fp32 scoring needs neither, and it costs no
accuracy anywhere: S_ema is the same for all G thoughts of a context, so it cancels from
the group advantages; only the logged reward level depends on it. The price is fp32
compute for one no-gradient forward over the document windows per step.

Teacher work only where it matters (`rlp.teacher_scoring`, issue 28): because S_ema is one
value per context, `A_i = G/(G-1) * (S_pred_i - mean_j S_pred_j)` whatever S_ema is, so the
update (loss, gradients, parameters) does not depend on it
(tests/e2e/test_teacher_cancellation.py proves it to fp32 rounding). Only the logged reward
level (`reward_mean`, `reward_std`, `s_ema`) needs the teacher:

    every_step    score S_ema at every step (the paper's recipe; the default)
    log_interval  score only at steps whose metrics reach the console (step 1 and every
                  `train.log_interval`-th); the shadow is kept and updated every step
    off           never score; no shadow is built, updated or checkpointed
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_rlp.models.provider import unwrap_model

TEACHER_SCORING = ("every_step", "log_interval", "off")


def teacher_scores(mode: str, step: int, log_interval: int) -> bool:
    """Whether step `step` (1-based) scores S_ema under `rlp.teacher_scoring=mode`: always for
    `every_step`, never for `off`, and for `log_interval` at step 1 and every multiple of
    `log_interval` (the steps `train.loop` prints, so every console line carries the reward).

    Raises:
        ValueError: for a mode not in `TEACHER_SCORING`.
    """
    if mode not in TEACHER_SCORING:
        raise ValueError(f"rlp.teacher_scoring={mode!r}: expected one of {TEACHER_SCORING}")
    if mode == "log_interval":
        return step == 1 or step % log_interval == 0
    return mode == "every_step"


def _averaged(model: nn.Module) -> dict[str, torch.Tensor]:
    """What phi averages: every parameter (every expert shard of an MoE model included) and
    the MoE routers' `expert_bias` buffers (Megatron's aux-loss-free balancing state, moved
    by token counts in `finalize_model_grads`, not by gradients; it decides the routing)."""
    return {**dict(model.named_parameters()),
            **{n: b for n, b in model.named_buffers() if n.endswith("expert_bias")}}


class EMATeacher:
    """Holds phi and updates it from theta. No gradients, no communication: every rank
    updates its own shard from its own shard.

    Args:
        model: a freshly built model with the policy's architecture and layout; its
            parameters are overwritten on the first `update`/`initialize_from`.
        decay: tau.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.model = model.float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.initialized = False

    def _pairs(self, policy: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        phi, theta = _averaged(self.model), _averaged(unwrap_model(policy))
        if phi.keys() != theta.keys():
            raise ValueError("EMA teacher and policy have different parameters")
        names = list(phi)
        return [phi[n] for n in names], [theta[n] for n in names]

    @torch.no_grad()
    def initialize_from(self, policy: nn.Module) -> None:
        """phi <- theta (the lazy first-step initialisation)."""
        phi, theta = self._pairs(policy)
        for a, b in zip(phi, theta, strict=True):
            a.copy_(b.float())
        self.initialized = True

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        """phi <- tau*phi + (1-tau)*theta, in fp32."""
        if not self.initialized:
            self.initialize_from(policy)
            return
        phi, theta = self._pairs(policy)
        torch._foreach_mul_(phi, self.decay)
        torch._foreach_add_(phi, [t.float() for t in theta], alpha=1.0 - self.decay)
