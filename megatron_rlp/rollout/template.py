"""The prompt the policy thinks in: `rlp.thought_template` (none | paper | a `{context}` string).

RLP.md ("Paper settings", v2 appendix): a short system instruction says to continue the
text, first thinking briefly between `<think>` and `</think>`, then continuing in the same
style; the teacher sees raw x_<t. With a template the policy (rollout, S_pred and the update,
per-context and shared-prefix/packed paths alike) reads

    before + doc[ws:t] + after + <think> thought </think> x_t

while the EMA teacher's no-think baseline S_ema = log pbar_phi(x_t | x_<t) keeps scoring the
raw document windows (`data.batches.DocumentWindows`), so the reward stays the information
gain over the raw prefix.

- `before` (the text before `{context}`) is the same for every context of a step, so it is
  prepended to the policy's prompts *and* to its shared document windows: a window still
  starts every prefix of its document (`packing.tree.pack_branches` needs that).
- `after` differs per context in position (it follows x_<t, not the window's end), so it
  cannot live in a shared window. It is fed as forced tokens right before `<think>`: the
  "lead" `after + <think>`, which the rollouts feed after the prefix (per context: appended
  to the prompt; shared prefill: decode steps on each context's cut cache) and the update
  places before each thought (`update_batch`, `pack_branches`). No loss on lead tokens.

The template's two texts are tokenized on their own (the document is pre-tokenized); with a
BPE tokenizer the boundary tokens may differ from tokenizing the joined string. `<think>`
and `</think>` in a template are the tokenizer's marker ids (Qwen3's 151667/151668 when it
has them, `tokenizer/hf.py`). `none` keeps today's tensors bit for bit (no copy is made).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The template's text is a config rule (config/rlp.py); its names stay importable here.
from megatron_rlp.config.rlp import (  # noqa: F401
    PAPER_INSTRUCTION,
    PAPER_TEMPLATE,
    PLACEHOLDER,
    TemplateError,
    parse_template,
    template_token_count,
)


@dataclass(frozen=True)
class ThoughtTemplate:
    """Token ids of a template.

    Attributes:
        before: ids prepended to every policy prompt and shared window.
        lead: forced ids after the prefix, ending with `<think>` (just `(<think>,)` for none).
    """

    before: tuple[int, ...]
    lead: tuple[int, ...]

    @property
    def extra_tokens(self) -> int:
        """Tokens a template adds to a rollout sequence beyond `prefix <think>`."""
        return len(self.before) + len(self.lead) - 1


def build_template(spec: str, tokenizer) -> ThoughtTemplate:
    """Tokenize `rlp.thought_template` with the run's tokenizer (see the module docstring)."""
    parts = parse_template(spec)
    if parts is None:
        return ThoughtTemplate(before=(), lead=(tokenizer.think_start,))
    before, after = parts
    return ThoughtTemplate(before=tuple(tokenizer.encode(before)) if before else (),
                           lead=(*(tokenizer.encode(after) if after else ()),
                                 tokenizer.think_start))


def lead_ids(think_start) -> list[int]:
    """`think_start` as given to the rollouts and update builders: one id (`<think>`) or the
    template's lead (forced ids ending with `<think>`) -> list of ids."""
    if isinstance(think_start, (list, tuple)):
        return [int(t) for t in think_start]
    return [int(think_start)]  # host ints only: nothing is created on any device


def _prepend(tokens: torch.Tensor, valid: torch.Tensor, ids: torch.Tensor, pad: int):
    """Left-padded [N, W] rows -> [N, W + k] rows with `ids` (k) right before each row's
    first valid column (the rows stay right-aligned, so column c moves to c + k)."""
    n, w = tokens.shape
    k = len(ids)
    out = torch.cat([tokens.new_full((n, k), pad), tokens], 1)
    ok = torch.cat([valid.new_zeros((n, k)), valid], 1)
    first = (~valid).sum(1)  # the row's first valid column, now where `ids` go
    cols = first[:, None] + torch.arange(k, device=tokens.device)
    out.scatter_(1, cols, ids.to(tokens.device).expand(n, -1))
    ok.scatter_(1, cols, True)
    return out, ok


def apply_template(template: ThoughtTemplate, prompts, windows, pad: int):
    """The policy's prompts and shared windows for `template`; the inputs are not changed.

    Args:
        prompts: `rollout.thoughts.PromptBatch` (raw x_<t, left-padded [B, P]).
        windows: `data.batches.DocumentWindows` (raw windows, left-padded [D, W]).
        pad: padding id.

    Returns:
        (prompts, windows) with `template.before` ahead of each prefix and window: [B, P + k]
        and [D, W + k], lengths + k, cols + k; the same objects when `before` is empty.
    """
    if not template.before:
        return prompts, windows
    ids = torch.tensor(template.before, dtype=torch.long)
    k = len(ids)
    p_tokens, p_valid = _prepend(prompts.tokens, prompts.valid, ids, pad)
    w_tokens, w_valid = _prepend(windows.tokens, windows.valid, ids, pad)
    new_prompts = type(prompts)(tokens=p_tokens, valid=p_valid, lengths=prompts.lengths + k,
                                targets=prompts.targets, context_ids=prompts.context_ids)
    new_windows = type(windows)(tokens=w_tokens, valid=w_valid, rows=windows.rows,
                                cols=windows.cols + k, targets=windows.targets)
    return new_prompts, new_windows
