"""The RLP section (`rlp`): contexts, thoughts, sampling, the clipped surrogate, the EMA
teacher; with the two pure rules the rest of the package reads from it: the longest document
window (`max_window_tokens`, used by `data/contexts.py`) and the thought template's text
(`parse_template`, used by `rollout/template.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from megatron_rlp.config.errors import ConfigError, check

PAPER_INSTRUCTION = ("Continue the text below. First think briefly between <think> and "
                     "</think>, then continue in the same style.\n\n")
PAPER_TEMPLATE = PAPER_INSTRUCTION + "{context}"
PLACEHOLDER = "{context}"


def band_width(min_prefix: int, max_prefix: int, band: int = 0) -> int:
    """Candidate positions of one document's band: max_prefix - min_prefix + 1 (the positions
    a window of max_prefix holds past min_prefix), narrowed to `band` when 0 < band < that
    (a shrunk recipe keeps a band its prefixes allow)."""
    widest = max_prefix - min_prefix + 1
    return min(band, widest) if band else widest


def max_window_tokens(min_prefix: int, max_prefix: int, positions_per_doc: int,
                      strategy: str = "uniform", stride: int = 1, band: int = 0) -> int:
    """Longest document window (and so longest prefix) the sampler can produce, in tokens.

    One position per document: `max_prefix`. Several: `max_prefix` plus the widest spread
    t_k - t_1 of one document's positions, (positions_per_doc - 1) * stride for "stride",
    else the band width minus one (max_prefix - min_prefix by default; see the module
    docstring of `data/contexts.py`). What config validation checks
    `model.max_sequence_length` and memory estimates against.
    """
    if positions_per_doc <= 1:
        return max_prefix
    if strategy == "stride":
        return max_prefix + (positions_per_doc - 1) * stride
    return max_prefix + band_width(min_prefix, max_prefix, band) - 1


class TemplateError(ValueError):
    """A bad `rlp.thought_template`; the message says what is allowed."""


def parse_template(spec: str) -> tuple[str, str] | None:
    """`rlp.thought_template` -> (text before the context, text after it), None for `none`.

    Raises:
        TemplateError: a string that is not `none`/`paper` and does not hold `{context}`
            exactly once, or whose text after it holds `<think>` or `</think>`.
    """
    if spec == "none":
        return None
    if spec == "paper":
        spec = PAPER_TEMPLATE
    if spec.count(PLACEHOLDER) != 1:
        raise TemplateError("none, paper, or a string containing {context} exactly once")
    before, after = spec.split(PLACEHOLDER)
    # The text after {context} is fed as forced tokens right before the thought's <think>:
    # a marker there would open or close a thought outside the sampled one (the text before
    # may mention them, as the paper's instruction does).
    if "<think>" in after or "</think>" in after:
        raise TemplateError("a text after {context} without <think> or </think> (the "
                            "thought's markers; <think> is added after it)")
    return before, after


def template_token_count(spec: str, tokenizer_spec: str) -> int:
    """Tokens `spec` adds to a rollout sequence beyond `prefix <think>` (for the config's
    sequence-length check; `rollout.template.ThoughtTemplate.extra_tokens` of the same
    template); builds the tokenizer only for a template other than `none`."""
    parts = parse_template(spec)
    if parts is None:
        return 0
    from megatron_rlp.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_spec)
    return sum(len(tokenizer.encode(text)) for text in parts if text)


@dataclass(kw_only=True)
class RLPConfig:
    """The RLP objective (see RLP.md): G thoughts per context, info-gain reward, clipped
    surrogate, EMA teacher."""

    contexts_per_step: int = 8
    """B: contexts per step, global over the data-parallel ranks (split evenly among them)."""
    group_size: int = 4
    """G: thoughts sampled per context; >= 2 (the group advantage needs a baseline)."""
    positions_per_document: int = 1
    """Contexts drawn from one document (they share its window); a divisor of
    `contexts_per_step`, and they must fit the position band."""
    max_thought_tokens: int = 16
    """L_think: longest thought in tokens, `</think>` included; a thought still open then is
    closed by force."""
    temperature: float = 0.7
    """Sampling temperature of the thoughts; a finite number > 0."""
    top_p: float = 1.0
    """Nucleus sampling of the thoughts, in (0, 1]; 1 = off."""
    ema_decay: float = 0.999
    """tau of the EMA teacher, `phi <- tau*phi + (1-tau)*theta` after every optimizer step; in
    [0, 1)."""
    clip_eps_low: float = 0.2
    """Lower clip of the surrogate's importance ratio (1 - eps_low); in [0, 1)."""
    clip_eps_high: float = 0.2
    """Upper clip of the surrogate's importance ratio (1 + eps_high); >= 0."""
    min_prefix_tokens: int = 16
    """The earliest target position t in a document: every context reads at least this many
    tokens; <= `max_prefix_tokens`."""
    max_prefix_tokens: int = 192
    """Max context length: every context conditions on min(t, max_prefix_tokens) tokens, its
    full prefix. The contexts of one document share one window doc[ws : t_max], ws = max(0,
    t_min - max_prefix_tokens), so later positions read longer prefixes; a window is at most
    `max_window_tokens()` long (max_prefix_tokens with one position per document). See
    docs/performance.md."""
    position_strategy: Literal["uniform", "stride", "entropy"] = "uniform"
    """Where in a document the contexts are (data/contexts.py): `uniform` random positions,
    `stride` every `position_stride` tokens (random phase), `entropy` the positions where the
    EMA teacher's next-token distribution has the highest entropy (one teacher forward)."""
    position_stride: int = 64
    """Tokens between a document's positions with `position_strategy=stride`; >= 1."""
    position_band_tokens: int = 0
    """Candidate positions a document's positions are drawn from (a random band of the
    document); 0 (or more than that) = max_prefix_tokens - min_prefix_tokens + 1. It bounds
    the spread of one document's positions, so a window is at most max_prefix_tokens + band -
    1 tokens."""
    skip_thought_spans: bool = True
    """Never target a `<think>`/`</think>` marker or a token inside a span the corpus
    carries."""
    rollout_chunk_contexts: int = 0
    """Contexts sampled together in one rollout batch (rows = this x group_size); 0 = all of
    the rank's contexts at once. Smaller chunks bound the KV/SSM cache of a rollout."""
    logp_old_source: Literal["update", "rollout"] = "update"
    """The ratio's denominator (objective/policy_loss.py): `update` = the update's own detached
    log-probs (ratio 1, exact on-policy with one update per rollout); `rollout` = keep the
    rollout's sampling log-probs as the behaviour policy, each token weighted by the
    truncated importance ratio min(pi_old / pi_rollout, tis_cap)."""
    tis_cap: float = 2.0
    """Cap of the truncated importance weight with `logp_old_source=rollout`; a finite number
    > 0."""
    share_prefixes: bool = True
    """One forward per document window serves all its positions and thoughts: the rollout
    prefills each window once, the update packs a document's (position, thought) branches
    after its window with a tree mask (megatron_rlp/packing). Same thoughts, rewards and loss
    as the per-context path (false), which stays as the reference. Hybrid models too: Mamba
    layers fork/start branches from the conv and SSM states at each position."""
    cascade_decode: bool | None = None
    """Shared-prefix rollouts: keep each context's prefix K/V once and merge it with each
    thought row's own keys by log-sum-exp (packing/cascade.py), so the rollout cache holds
    C x P + R x T entries instead of R x (P + T). Exact up to fp32 rounding of the merge.
    None (auto) = on where the device is cuda (the recipes' memory estimates assume it), off
    on cpu, where the plain cache keeps runs bitwise equal to earlier releases."""
    compile_decode: bool = False
    """Shared-prefix rollouts: run each decode step after the fork (the model forward of one
    token over a static cache, and the sampler) under torch.compile (packing/compiled.py):
    inductor on cpu, inductor with CUDA graphs (`mode="reduce-overhead"`'s setting) on cuda.
    Static shapes: the decode batch is compacted to bucket sizes (R, then powers of two),
    the cache is read whole with later columns masked; graph compilations are counted in the
    `decode_compiles` metric. Same thoughts, log-probs within fp32 rounding. Eager (one
    warning) with Mamba or MoE layers, tensor or pipeline parallel; ignored with
    `share_prefixes=false`. Off by default: measured on cpu (docs/performance.md) it is
    2.4-3.2x faster per decode step at 0.8M, not measurably at 25M (0.93-1.35x), and each
    graph costs 30-130 s of cold compilation; not yet measured on cuda."""
    thought_template: str | None = "none"
    """The prompt the policy thinks in (rollout/template.py): `none` = `x_<t <think>` as is;
    `paper` = the paper's short instruction (continue the text, think briefly between
    `<think>` and `</think>`, then continue in the same style) before the context; or a string
    with one `{context}`: its text before is prepended, its text after is fed as forced
    tokens before `<think>` (no loss on either). The EMA teacher always scores raw `x_<t`. See
    "Thought format and ablation knobs" in docs/configuration.md. `null` (YAML) = `none`; the
    text after `{context}` may not hold `<think>` or `</think>`."""
    kl_coef: float = 0.0
    """KL penalty beta to a frozen reference policy (the policy at the start of the RLP stage;
    objective/kl.py, k3 estimator on thought tokens), metric `kl_ref`; 0 = off and no
    reference is built."""
    ntp_loss_coef: float = 0.0
    """Weight of a next-token cross-entropy on the step's raw document windows, added to the
    RLP loss (train/ntp_mix.py), metric `ntp_loss`; 0 = off. Not with an interleaved
    pipeline."""
    reward_tokens: int = 1
    """Reward horizon k (RLP.md's multi-token generalisation, scoring/horizon.py): S_pred and
    S_ema are the discounted sums of log p(x_{t+j} | ...) over x_t .. x_{t+k-1}, after the
    same thought and without it (cut at the document's end); 1 = the paper's one-token
    reward, computed by the rollout and the teacher as before. A task answer of k tokens is
    scored whole with k = its length."""
    reward_discount: float = 1.0
    """Discount gamma of the reward horizon: token j of the k counts gamma^j; in (0, 1]."""
    teacher_scoring: Literal["every_step", "log_interval", "off"] = "every_step"
    """When the EMA teacher scores S_ema (scoring/ema_teacher.py): `every_step`;
    `log_interval` = step 1 and every `train.log_interval`-th step (the console lines; the
    fp32 shadow is still updated every step); `off` = never, and no fp32 shadow is built,
    updated or checkpointed. S_ema cancels from the group advantages, so the update is the
    same under all three; only the reward metrics (`reward_mean`, `reward_std`, `s_ema`)
    need it. Metric `teacher_scored` says whether a step was scored."""

    def max_window_tokens(self) -> int:
        """Longest document window (= longest prefix) the context sampler can draw
        (`max_window_tokens` above)."""
        return max_window_tokens(self.min_prefix_tokens, self.max_prefix_tokens,
                                 self.positions_per_document, self.position_strategy,
                                 self.position_stride, self.position_band_tokens)

    def validate(self) -> None:
        try:
            if self.thought_template is None:  # `thought_template: null` in YAML
                self.thought_template = "none"
            parse_template(self.thought_template)
        except TemplateError as e:
            raise ConfigError(f"invalid config: rlp.thought_template={self.thought_template!r} "
                              f"(allowed: {e})") from None
        for key in ("kl_coef", "ntp_loss_coef"):
            v = getattr(self, key)
            check(0 <= v < math.inf, f"rlp.{key}", v, "a finite number >= 0 (0 = off)")
        check(isinstance(self.reward_tokens, int) and self.reward_tokens >= 1,
              "rlp.reward_tokens", self.reward_tokens, "an integer >= 1 (1 = the next token)")
        check(0 < self.reward_discount <= 1, "rlp.reward_discount", self.reward_discount,
              "in (0, 1]")
        check(0 < self.tis_cap < math.inf, "rlp.tis_cap", self.tis_cap, "a finite number > 0")
        check(isinstance(self.rollout_chunk_contexts, int) and self.rollout_chunk_contexts >= 0,
              "rlp.rollout_chunk_contexts", self.rollout_chunk_contexts,
              "an integer >= 0 (0 = all contexts in one rollout batch)")
        check(isinstance(self.group_size, int) and self.group_size >= 2, "rlp.group_size",
              self.group_size, "an integer >= 2 (group advantages need a baseline)")
        for key in ("contexts_per_step", "positions_per_document", "max_thought_tokens",
                    "min_prefix_tokens", "max_prefix_tokens"):
            v = getattr(self, key)
            check(isinstance(v, int) and v >= 1, f"rlp.{key}", v, "an integer >= 1")
        check(self.contexts_per_step % self.positions_per_document == 0,
              "rlp.positions_per_document", self.positions_per_document,
              f"a divisor of contexts_per_step={self.contexts_per_step}")
        check(0 < self.temperature < math.inf, "rlp.temperature", self.temperature,
              "a finite number > 0")
        check(0 < self.top_p <= 1, "rlp.top_p", self.top_p, "in (0, 1]")
        check(0 <= self.ema_decay < 1, "rlp.ema_decay", self.ema_decay, "in [0, 1)")
        check(0 <= self.clip_eps_low < 1, "rlp.clip_eps_low", self.clip_eps_low, "in [0, 1)")
        check(self.clip_eps_high >= 0, "rlp.clip_eps_high", self.clip_eps_high, ">= 0")
        check(self.min_prefix_tokens <= self.max_prefix_tokens, "rlp.min_prefix_tokens",
              self.min_prefix_tokens, f"<= max_prefix_tokens={self.max_prefix_tokens}")
        check(isinstance(self.position_stride, int) and self.position_stride >= 1,
              "rlp.position_stride", self.position_stride, "an integer >= 1")
        check(isinstance(self.position_band_tokens, int) and self.position_band_tokens >= 0,
              "rlp.position_band_tokens", self.position_band_tokens,
              "an integer >= 0 (0 = max_prefix_tokens - min_prefix_tokens + 1)")
        widest = self.max_prefix_tokens - self.min_prefix_tokens + 1
        # The band one document's positions are drawn from (data/contexts.py); it also
        # bounds how far apart they are, hence the window length.
        band = min(self.position_band_tokens, widest) if self.position_band_tokens else widest
        what = (f"position_band_tokens={band}" if band < widest else
                f"max_prefix_tokens - min_prefix_tokens + 1 = {band}")
        need = self.positions_per_document
        if self.position_strategy == "stride":
            need = (self.positions_per_document - 1) * self.position_stride + 1
        check(need <= band, "rlp.positions_per_document", self.positions_per_document,
              f"positions that fit one window of {what} candidate positions ({need} needed "
              f"with position_strategy={self.position_strategy})")
