"""One typed config for a run: dataclass sections, a YAML file, `section.key=value` overrides.

Validation happens here, before `torch.distributed` starts, so a bad value costs one line
naming the key, the value and what is allowed (`ConfigError`), never a traceback from deep
inside Megatron. Parallel sizes use Megatron's own key names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem, phrased for the user: key, value, what is allowed."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config: {key}={value!r} (allowed: {allowed})")


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture. Dense Qwen3-style models are HybridModel patterns of `*` (attention) and
    `-` (MLP) layers; `M` adds Mamba-2 layers (hybrid models)."""

    name: str = "tiny"
    hybrid_layer_pattern: str = "*-*-*-*-"
    hidden_size: int = 192
    ffn_hidden_size: int = 512
    num_attention_heads: int = 6
    num_query_groups: int = 2
    kv_channels: int | None = None  # head dim; None = hidden_size // num_attention_heads
    qk_layernorm: bool = True
    activation: Literal["swiglu", "squared_relu", "gelu"] = "swiglu"
    position_embedding_type: Literal["rope", "none"] = "rope"
    rotary_base: int = 1_000_000
    untie_embeddings_and_output_weights: bool = False
    max_sequence_length: int = 512
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-6
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 64
    # Mamba-2 mixer (used by `M` layers only); Megatron's conv width 4 and chunk 128 apply
    mamba_num_heads: int | None = None  # None = 2 * hidden_size / mamba_head_dim
    mamba_head_dim: int = 64
    mamba_state_dim: int = 128
    mamba_num_groups: int = 8
    # Layer implementation (Megatron-LM's --transformer-impl): `local` = Megatron's own torch
    # modules (models/local_spec.py, any device), `transformer_engine` = Megatron's TE spec
    # (models/te_spec.py: fused norm+linear, TE attention; CUDA + TE), `auto` = TE when it
    # imports and device.type=cuda, else local.
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    # Core attention of the branch-packed update (packing/flex.py): `flex` = FlexAttention with
    # a BlockMask (block-sparse, compiled, on CUDA; an eager fallback on CPU for tests), `mask`
    # = the explicit [B, 1, S, S] tree mask through Megatron's attention, `auto` = flex on
    # CUDA for attention-only patterns, else mask.
    packed_attention: Literal["auto", "flex", "mask"] = "auto"
    # Mixture of experts (`E` layers; docs/moe.md), Megatron-LM's names and meanings. The
    # experts are Megatron's MoELayer (router, token dispatcher, local experts).
    num_experts: int | None = None  # routed experts per `E` layer
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None  # one expert's FFN width; None = ffn_hidden_size
    moe_shared_expert_intermediate_size: int | None = None  # null = no shared expert
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss",
                                            "none"] = "aux_loss"
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: float | None = None
    moe_router_enable_expert_bias: bool = False  # aux-loss-free balancing (DeepSeek-V3)
    moe_router_bias_update_rate: float = 1e-3
    moe_router_dtype: Literal["fp32", "fp64"] | None = None
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    # Token dropping: null = none (every token reaches its top-k experts; required by RLP's
    # exact on-policy routing, see docs/moe.md).
    moe_expert_capacity_factor: float | None = None

    def validate(self) -> None:
        pat = self.hybrid_layer_pattern
        # The other HybridModel kinds (G, D, +, ...) need layer specs this package does not ship.
        _check(set(pat) <= set("M*-E|") and any(c in "M*-E" for c in pat) and "||" not in pat,
               "model.hybrid_layer_pattern", pat,
               "a non-empty string of M (Mamba-2), * (attention), - (MLP) and E (MoE) layers, "
               "| between pipeline stages")
        if "M" in pat:
            self._validate_mamba()
        self._validate_moe()
        for key in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                    "max_sequence_length", "make_vocab_size_divisible_by"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v > 0, f"model.{key}", v, "a positive integer")
        heads = self.num_attention_heads
        _check(heads % self.num_query_groups == 0, "model.num_query_groups",
               self.num_query_groups, f"a divisor of num_attention_heads={heads}")
        _check(self.kv_channels is None or self.kv_channels > 0, "model.kv_channels",
               self.kv_channels, "a positive integer or null")
        if self.kv_channels is None:
            _check(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
                   self.hidden_size, "a multiple of num_attention_heads (or set kv_channels)")
        _check(self.norm_epsilon > 0, "model.norm_epsilon", self.norm_epsilon, "> 0")
        _check(self.init_method_std > 0, "model.init_method_std", self.init_method_std, "> 0")

    def _validate_moe(self) -> None:
        """The MoE keys: only with `E` layers, and the combinations Megatron would assert on
        deep inside (or, worse, accept) refused here."""
        pat, n = self.hybrid_layer_pattern, self.num_experts
        if "E" not in pat:
            _check(n is None, "model.num_experts", n,
                   "null without E layers in model.hybrid_layer_pattern")
            return
        _check(isinstance(n, int) and n >= 1, "model.num_experts", n,
               "an integer >= 1 with E layers in model.hybrid_layer_pattern")
        k = self.moe_router_topk
        _check(isinstance(k, int) and 1 <= k <= n, "model.moe_router_topk", k,
               f"an integer in [1, num_experts={n}]")
        for key in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            v = getattr(self, key)
            _check(v is None or v > 0, f"model.{key}", v, "a positive integer or null")
        _check(0 <= self.moe_aux_loss_coeff < math.inf, "model.moe_aux_loss_coeff",
               self.moe_aux_loss_coeff, "a finite number >= 0")
        _check(self.moe_aux_loss_coeff == 0 or self.moe_router_load_balancing_type != "none",
               "model.moe_aux_loss_coeff", self.moe_aux_loss_coeff,
               "0 with moe_router_load_balancing_type=none")
        z = self.moe_z_loss_coeff
        _check(z is None or 0 <= z < math.inf, "model.moe_z_loss_coeff", z,
               "null or a finite number >= 0")
        f = self.moe_router_topk_scaling_factor
        _check(f is None or 0 < f < math.inf, "model.moe_router_topk_scaling_factor", f,
               "null or a finite number > 0")
        _check(not self.moe_router_pre_softmax or self.moe_router_score_function == "softmax",
               "model.moe_router_pre_softmax", self.moe_router_pre_softmax,
               "false with moe_router_score_function=sigmoid")
        _check(0 < self.moe_router_bias_update_rate < math.inf,
               "model.moe_router_bias_update_rate", self.moe_router_bias_update_rate, "> 0")
        c = self.moe_expert_capacity_factor
        _check(c is None or 0 < c < math.inf, "model.moe_expert_capacity_factor", c,
               "null (no token dropping) or a finite number > 0")

    def mamba_heads(self) -> int:
        """Mamba-2 heads: `mamba_num_heads`, or Megatron's default 2 * hidden / head_dim."""
        if self.mamba_num_heads is not None:
            return self.mamba_num_heads
        return 2 * self.hidden_size // self.mamba_head_dim

    def _validate_mamba(self) -> None:
        for key in ("mamba_head_dim", "mamba_state_dim", "mamba_num_groups"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v > 0, f"model.{key}", v, "a positive integer")
        if self.mamba_num_heads is None:
            _check(2 * self.hidden_size % self.mamba_head_dim == 0, "model.mamba_head_dim",
                   self.mamba_head_dim, f"a divisor of 2 * hidden_size={2 * self.hidden_size} "
                   "(or set mamba_num_heads)")
        else:
            _check(self.mamba_num_heads > 0, "model.mamba_num_heads", self.mamba_num_heads,
                   "a positive integer or null")
        heads = self.mamba_heads()
        _check(heads % self.mamba_num_groups == 0, "model.mamba_num_groups",
               self.mamba_num_groups, f"a divisor of the {heads} Mamba heads")


@dataclass(kw_only=True)
class ParallelConfig:
    """Megatron parallel layout. Data parallel size is world_size / (TP * PP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Interleaved pipeline: each rank holds this many model chunks (null = one). The layer
    # pattern names the PP x VP chunks with `|`; chunk i of rank r is segment i*PP + r.
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # Experts of each `E` layer split over this many data-parallel ranks (Megatron's expert
    # parallelism; the expert tensor-parallel size is TP). EP x TP x PP divides the world.
    expert_model_parallel_size: int = 1

    def validate(self) -> None:
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                    "expert_model_parallel_size"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v >= 1, f"parallel.{key}", v, "an integer >= 1")
        vp = self.virtual_pipeline_model_parallel_size
        _check(vp is None or (isinstance(vp, int) and vp >= 2 and
                              self.pipeline_model_parallel_size >= 2),
               "parallel.virtual_pipeline_model_parallel_size", vp,
               "null, or an integer >= 2 with pipeline_model_parallel_size >= 2")
        _check(not self.sequence_parallel or self.tensor_model_parallel_size > 1,
               "parallel.sequence_parallel", self.sequence_parallel,
               "true only with tensor_model_parallel_size > 1")


@dataclass(kw_only=True)
class RLPConfig:
    """The RLP objective (see RLP.md): G thoughts per context, info-gain reward, clipped
    surrogate, EMA teacher."""

    contexts_per_step: int = 8  # B, global over data-parallel ranks
    group_size: int = 4  # G thoughts per context
    positions_per_document: int = 1  # contexts drawn from one document
    max_thought_tokens: int = 16  # L_think, `</think>` included
    temperature: float = 0.7
    top_p: float = 1.0
    ema_decay: float = 0.999  # tau
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    min_prefix_tokens: int = 16
    # Max context length: every context conditions on at least min(t, max_prefix_tokens)
    # tokens, its full prefix. The contexts of one document share one window doc[ws : t_max],
    # ws = max(0, t_min - max_prefix_tokens), so later positions read longer prefixes; a window
    # is at most `max_window_tokens()` long (max_prefix_tokens with one position per document).
    max_prefix_tokens: int = 192
    # Where in a document the contexts are (data/contexts.py): `uniform` random positions,
    # `stride` every `position_stride` tokens (random phase), `entropy` the positions where the
    # EMA teacher's next-token distribution has the highest entropy (one teacher forward).
    position_strategy: Literal["uniform", "stride", "entropy"] = "uniform"
    position_stride: int = 64
    # Candidate positions a document's positions are drawn from (a random band of the
    # document): max_prefix_tokens - min_prefix_tokens + 1 when 0 or more. It bounds the
    # spread of one document's positions, so a window is at most max_prefix_tokens + band - 1
    # tokens.
    position_band_tokens: int = 0
    # Never target a `<think>`/`</think>` marker or a token inside a span the corpus carries.
    skip_thought_spans: bool = True
    # Contexts sampled together in one rollout batch (rows = this x group_size); 0 = all of
    # the rank's contexts at once. Smaller chunks bound the KV/SSM cache of a rollout.
    rollout_chunk_contexts: int = 0
    # The ratio's denominator (objective/policy_loss.py): `update` = the update's own detached
    # log-probs (ratio 1, exact on-policy with one update per rollout); `rollout` = keep the
    # rollout's sampling log-probs as the behaviour policy, each token weighted by the
    # truncated importance ratio min(pi_old / pi_rollout, tis_cap).
    logp_old_source: Literal["update", "rollout"] = "update"
    tis_cap: float = 2.0
    # One forward per document window serves all its positions and thoughts: the rollout
    # prefills each window once, the update packs a document's (position, thought) branches
    # after its window with a tree mask (megatron_rlp/packing). Same thoughts, rewards and loss
    # as the per-context path (false), which stays as the reference. Hybrid models too: Mamba
    # layers fork/start branches from the conv and SSM states at each position.
    share_prefixes: bool = True
    # The prompt the policy thinks in (rollout/template.py): `none` = `x_<t <think>` as is;
    # `paper` = the paper's short instruction (continue the text, think briefly between
    # <think> and </think>, then continue in the same style) before the context; or a string
    # with one `{context}`: its text before is prepended, its text after is fed as forced
    # tokens before `<think>` (no loss on either). The EMA teacher always scores raw x_<t.
    thought_template: str = "none"
    # KL penalty beta to a frozen reference policy (the policy at the start of the RLP stage;
    # objective/kl.py, k3 estimator on thought tokens); 0 = off and no reference is built.
    kl_coef: float = 0.0
    # Weight of a next-token cross-entropy on the step's raw document windows, added to the
    # RLP loss (train/ntp_mix.py); 0 = off.
    ntp_loss_coef: float = 0.0

    def max_window_tokens(self) -> int:
        """Longest document window (= longest prefix) the context sampler can draw
        (`data.contexts.max_window_tokens`)."""
        from megatron_rlp.data.contexts import max_window_tokens

        return max_window_tokens(self.min_prefix_tokens, self.max_prefix_tokens,
                                 self.positions_per_document, self.position_strategy,
                                 self.position_stride, self.position_band_tokens)

    def validate(self) -> None:
        from megatron_rlp.rollout.template import TemplateError, parse_template

        try:
            parse_template(self.thought_template)
        except TemplateError as e:
            raise ConfigError(f"invalid config: rlp.thought_template={self.thought_template!r} "
                              f"(allowed: {e})") from None
        for key in ("kl_coef", "ntp_loss_coef"):
            v = getattr(self, key)
            _check(0 <= v < math.inf, f"rlp.{key}", v, "a finite number >= 0 (0 = off)")
        _check(0 < self.tis_cap < math.inf, "rlp.tis_cap", self.tis_cap, "a finite number > 0")
        _check(isinstance(self.rollout_chunk_contexts, int) and self.rollout_chunk_contexts >= 0,
               "rlp.rollout_chunk_contexts", self.rollout_chunk_contexts,
               "an integer >= 0 (0 = all contexts in one rollout batch)")
        _check(isinstance(self.group_size, int) and self.group_size >= 2, "rlp.group_size",
               self.group_size, "an integer >= 2 (group advantages need a baseline)")
        for key in ("contexts_per_step", "positions_per_document", "max_thought_tokens",
                    "min_prefix_tokens", "max_prefix_tokens"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v >= 1, f"rlp.{key}", v, "an integer >= 1")
        _check(self.contexts_per_step % self.positions_per_document == 0,
               "rlp.positions_per_document", self.positions_per_document,
               f"a divisor of contexts_per_step={self.contexts_per_step}")
        _check(0 < self.temperature < math.inf, "rlp.temperature", self.temperature,
               "a finite number > 0")
        _check(0 < self.top_p <= 1, "rlp.top_p", self.top_p, "in (0, 1]")
        _check(0 <= self.ema_decay < 1, "rlp.ema_decay", self.ema_decay, "in [0, 1)")
        _check(0 <= self.clip_eps_low < 1, "rlp.clip_eps_low", self.clip_eps_low, "in [0, 1)")
        _check(self.clip_eps_high >= 0, "rlp.clip_eps_high", self.clip_eps_high, ">= 0")
        _check(self.min_prefix_tokens <= self.max_prefix_tokens, "rlp.min_prefix_tokens",
               self.min_prefix_tokens, f"<= max_prefix_tokens={self.max_prefix_tokens}")
        _check(isinstance(self.position_stride, int) and self.position_stride >= 1,
               "rlp.position_stride", self.position_stride, "an integer >= 1")
        _check(isinstance(self.position_band_tokens, int) and self.position_band_tokens >= 0,
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
        _check(need <= band, "rlp.positions_per_document", self.positions_per_document,
               f"positions that fit one window of {what} candidate positions ({need} needed "
               f"with position_strategy={self.position_strategy})")


@dataclass(kw_only=True)
class OptimizerConfig:
    """Adam(W) through Megatron's `get_megatron_optimizer`, with its lr scheduler."""

    lr: float = 1e-4
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def validate(self) -> None:
        _check(0 < self.lr < math.inf, "optimizer.lr", self.lr, "a finite number > 0")
        _check(0 <= self.min_lr <= self.lr, "optimizer.min_lr", self.min_lr, "in [0, lr]")
        _check(self.lr_warmup_steps >= 0, "optimizer.lr_warmup_steps", self.lr_warmup_steps,
               ">= 0")
        _check(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, ">= 0")
        for key in ("adam_beta1", "adam_beta2"):
            v = getattr(self, key)
            _check(0 <= v < 1, f"optimizer.{key}", v, "in [0, 1)")
        _check(self.adam_eps > 0, "optimizer.adam_eps", self.adam_eps, "> 0")
        _check(self.clip_grad >= 0, "optimizer.clip_grad", self.clip_grad, ">= 0 (0 = off)")


@dataclass(kw_only=True)
class DataConfig:
    """Where text comes from and how it is tokenized (docs/data_and_models.md).

    `corpus` is a JSONL/.txt file (tokenized at start-up) or the prefix of a Megatron indexed
    dataset (`PREFIX.bin` + `PREFIX.idx`, made by tools/preprocess_data.py). `blend` replaces
    it with several indexed datasets: `"0.7 PREFIX_A 0.3 PREFIX_B"` (weights, or no weights
    to blend by size), as one string or a YAML list. `split` cuts every dataset's documents
    into train/valid/test ranges, Megatron-style ("98,2,0").
    """

    corpus: str = "data/corpus.jsonl"
    blend: list[str] | None = None
    split: str = "100,0,0"  # train,valid,test weights over each dataset's documents
    cache_dir: str | None = None  # Megatron's dataset index cache; None = beside each prefix
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json (or its dir)
    ntp_seq_length: int = 128  # window length for `train.objective=ntp`
    ntp_batch_size: int = 16  # global sequences per NTP step

    def split_weights(self) -> list[float]:
        """`split` as three non-negative numbers (train, valid, test)."""
        parts = [p for p in self.split.replace(" ", "").split(",") if p]
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            weights = []
        ok = 1 <= len(weights) <= 3 and all(w >= 0 and math.isfinite(w) for w in weights)
        _check(ok and weights[0] > 0, "data.split", self.split,
               "up to three comma-separated weights train,valid,test with train > 0, e.g. 98,2,0")
        return weights + [0.0] * (3 - len(weights))

    def validate(self) -> None:
        _check(bool(self.corpus), "data.corpus", self.corpus,
               "a path to a .jsonl or .txt file, or an indexed-dataset prefix")
        if self.blend is not None:
            from megatron_rlp.data.indexed import BlendError, parse_blend

            try:
                prefixes, _ = parse_blend(self.blend)
            except BlendError as e:
                raise ConfigError(f"invalid config: data.blend={self.blend!r} (allowed: {e})"
                                  ) from None
            for prefix in prefixes:
                _check(Path(prefix + ".idx").is_file() and Path(prefix + ".bin").is_file(),
                       "data.blend", prefix, "indexed-dataset prefixes with .bin and .idx files "
                       "(tools/preprocess_data.py writes them)")
        self.split_weights()
        _check(self.tokenizer == "byte" or Path(self.tokenizer).exists(), "data.tokenizer",
               self.tokenizer, "'byte' or an existing tokenizer.json path")
        _check(self.ntp_seq_length >= 2, "data.ntp_seq_length", self.ntp_seq_length, ">= 2")
        _check(self.ntp_batch_size >= 1, "data.ntp_batch_size", self.ntp_batch_size, ">= 1")


@dataclass(kw_only=True)
class TrainConfig:
    """The loop: objective, steps, logging, checkpoints, and what ends a run early.

    Fault handling (docs/reliability.md): a step whose loss or gradient is not finite is
    skipped (no parameter, optimizer or teacher change) and counted; `max_consecutive_skips`
    in a row stop the run with an error. SIGTERM/SIGUSR1, `wall_time_limit_minutes` and
    `exit_interval` stop it cleanly: every rank saves at the next step boundary, exit code 0.
    """

    objective: Literal["rlp", "ntp"] = "rlp"
    steps: int = 20
    seed: int = 1234
    log_interval: int = 1
    metrics_file: str | None = None
    save: str | None = None  # checkpoint directory
    save_interval: int = 0  # 0 = only at the end (when `save` is set)
    keep_last: int = 0  # keep this many newest checkpoints under `save`; 0 = keep all
    checkpoint_checksums: bool = True  # SHA-256 manifest on save, verified on load
    # Distributed-optimizer state on disk: `dp_reshardable` (each rank writes its shards; loads
    # with any DP size, same TP/PP) or `fully_reshardable` (gathered per parameter over DP on
    # save; loads into any TP/PP/DP layout).
    dist_optimizer_checkpoint: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    load: str | None = None  # resume from (same objective) or warm-start (other objective)
    # With a Megatron-LM checkpoint in `load`: take the model section from its saved args
    # (Megatron-LM's --use-checkpoint-args); otherwise they are checked against the model.
    use_checkpoint_args: bool = False
    micro_batch_size: int = 0  # sequences per update micro-batch; 0 = all at once
    # Activation recomputation in the update (Megatron's): `selective` recomputes the core
    # attention (the seq^2 scores) in backward, `full` whole layers in groups of
    # `recompute_num_layers` (only their inputs are kept). Same gradients, less memory.
    recompute_granularity: Literal["none", "selective", "full"] = "none"
    recompute_num_layers: int = 1
    max_consecutive_skips: int = 5  # non-finite steps in a row before the run stops
    wall_time_limit_minutes: float = 0.0  # save and exit 0 after this long; 0 = no limit
    exit_interval: int = 0  # save and exit 0 after a step divisible by this; 0 = off
    # Held-out evaluation on the valid split (train/validate.py): next-token NLL without and
    # with a thought, every `eval_interval` steps (0 = never), on `eval_contexts` contexts.
    eval_interval: int = 0
    eval_contexts: int = 32
    # Where the held-out contexts are (one position per document): `uniform` (default),
    # `stride` (rlp.position_stride), `entropy` (the teacher's highest-entropy positions;
    # data/contexts.py) or `answer` (the answers' first tokens of a task corpus with
    # answer_offsets, data/answer_positions.py).
    eval_position_strategy: Literal["uniform", "stride", "entropy", "answer"] = "uniform"
    # Logging (train/metrics.py): optional; a missing package is a notice, never an error.
    tensorboard_dir: str | None = None  # TensorBoard scalars (needs the tensorboard package)
    wandb_project: str | None = None  # Weights & Biases (needs wandb; WANDB_MODE=offline works)
    progress: bool = True  # rank 0: ETA column on console lines, a live bar on a terminal
    # Resuming (train/resume.py), as Megatron-LM's flags: `finetune` (--finetune) loads the
    # policy weights only and starts at step 0; `load_optimizer` / `load_rng` false skip the
    # Adam state / the RNG states (--no-load-optim / --no-load-rng); `override_scheduler`
    # true makes the configured lr/wd schedule apply from the loaded step
    # (--override-opt_param-scheduler), false keeps the checkpoint's
    # (--use-checkpoint-opt_param-scheduler).
    finetune: bool = False
    load_optimizer: bool = True
    load_rng: bool = True
    override_scheduler: bool = True
    # Hangs (train/watchdog.py): the process-group timeout of every collective (Megatron's
    # --distributed-timeout-minutes), and the longest one step, save or load may take before
    # the rank prints every thread's stack and exits 3 (0 = off). A whole step can take
    # longer than one collective: the default hour leaves room for long RLP steps at scale;
    # set it to a few times your step time. Fractions of a minute are allowed.
    distributed_timeout_minutes: float = 10.0
    watchdog_minutes: float = 60.0

    def watchdog_seconds(self) -> float:
        """The per-step/per-save limit in seconds (0 = off)."""
        return 60.0 * self.watchdog_minutes

    def validate(self) -> None:
        _check(self.steps >= 0, "train.steps", self.steps, "an integer >= 0")
        _check(self.log_interval >= 1, "train.log_interval", self.log_interval, ">= 1")
        _check(self.save_interval >= 0, "train.save_interval", self.save_interval, ">= 0")
        _check(self.keep_last >= 0, "train.keep_last", self.keep_last, ">= 0 (0 = keep all)")
        _check(self.micro_batch_size >= 0, "train.micro_batch_size", self.micro_batch_size,
               ">= 0")
        _check(self.recompute_num_layers >= 1, "train.recompute_num_layers",
               self.recompute_num_layers, "an integer >= 1")
        _check(self.max_consecutive_skips >= 1, "train.max_consecutive_skips",
               self.max_consecutive_skips, "an integer >= 1")
        _check(0 <= self.wall_time_limit_minutes < math.inf, "train.wall_time_limit_minutes",
               self.wall_time_limit_minutes, "a finite number >= 0 (0 = no limit)")
        _check(self.exit_interval >= 0, "train.exit_interval", self.exit_interval,
               ">= 0 (0 = off)")
        _check(self.eval_interval >= 0, "train.eval_interval", self.eval_interval, ">= 0 (0 = off)")
        _check(self.eval_contexts >= 1, "train.eval_contexts", self.eval_contexts, ">= 1")
        if self.save is not None:
            _check(bool(self.save) and not Path(self.save).is_file(), "train.save", self.save,
                   "a directory path (not an existing file)")
        if self.load is not None:
            _check(Path(self.load).is_dir(), "train.load", self.load,
                   "an existing checkpoint directory")
            _check(not _hf_model_dir(Path(self.load)), "train.load", self.load,
                   "a checkpoint directory; this is a Hugging Face model directory: convert it "
                   f"first with `python tools/convert_checkpoint.py hf-to-megatron --hf-dir "
                   f"{self.load} --out {self.load.rstrip('/')}-megatron`, then "
                   f"train.load={self.load.rstrip('/')}-megatron")
        _check(0 < self.distributed_timeout_minutes < math.inf,
               "train.distributed_timeout_minutes", self.distributed_timeout_minutes,
               "a finite number of minutes > 0 (Megatron's default: 10)")
        _check(0 <= self.watchdog_minutes < math.inf, "train.watchdog_minutes",
               self.watchdog_minutes, "a finite number of minutes >= 0 (0 = off)")
        _check(not (self.finetune and self.load is None), "train.finetune", self.finetune,
               "true only with train.load set (the weights to fine-tune)")
        if self.tensorboard_dir is not None:
            _check(bool(self.tensorboard_dir) and not Path(self.tensorboard_dir).is_file(),
                   "train.tensorboard_dir", self.tensorboard_dir,
                   "a directory path (not an existing file) or null")
        if self.wandb_project is not None:
            _check(bool(self.wandb_project.strip()) and "/" not in self.wandb_project,
                   "train.wandb_project", self.wandb_project, "a W&B project name or null")


def _hf_model_dir(path: Path) -> bool:
    """A Hugging Face model directory (config.json + weights), not a checkpoint?"""
    if (path / "latest").exists() or (path / "metadata.json").exists() or \
            any(path.glob("step_*")):
        return False
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        or (path / "model.safetensors.index.json").is_file())


@dataclass(kw_only=True)
class DeviceConfig:
    """`cpu` runs the real Megatron-Core code on CPU with gloo (see backends/cpu.py)."""

    type: Literal["cpu", "cuda"] = "cpu"
    num_threads: int = 0  # torch intra-op threads per rank on CPU; 0 = cores / local ranks

    def validate(self) -> None:
        _check(self.num_threads >= 0, "device.num_threads", self.num_threads, ">= 0")


@dataclass(kw_only=True)
class PrecisionConfig:
    """Parameter/compute dtype; FP8 (Transformer Engine, Hopper) is for device=cuda only.
    The EMA teacher is always fp32."""

    params_dtype: Literal["fp32", "bf16"] = "fp32"
    # FP8 through Megatron's TransformerConfig (Transformer Engine layers only; requirements in
    # backends/transformer_engine.py): format, scaling recipe, FP8 parameters all-gathered
    # (Megatron-LM's --fp8-param-gather: TransformerConfig.fp8_param + DDP fp8_param_gather).
    fp8: Literal["hybrid", "e4m3"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    fp8_param_gather: bool = False
    # Keep the first/last N layers (global layer numbers) in bf16 under FP8 (Megatron's names;
    # not with the delayed recipe, which Megatron refuses).
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1
    # Rollouts (and the teacher's scoring) run in bf16 even when training in FP8: the forward
    # runs with FP8 switched off (models/fp8.py). true = rollouts under the FP8 autocast too.
    fp8_rollouts: bool = False

    def validate(self) -> None:
        for key in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v >= 0, f"precision.{key}", v, "an integer >= 0")
        if self.fp8 is None:
            for key in ("fp8_param_gather", "first_last_layers_bf16", "fp8_rollouts"):
                _check(not getattr(self, key), f"precision.{key}", getattr(self, key),
                       "false unless precision.fp8 is set (e4m3 or hybrid)")
            _check(self.fp8_recipe == "delayed", "precision.fp8_recipe", self.fp8_recipe,
                   "the default (delayed) unless precision.fp8 is set (e4m3 or hybrid)")
        # The FP8 rules that need the machine (TE, GPU) are in RunConfig._check_transformer_engine.


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rlp: RLPConfig = field(default_factory=RLPConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

    def validate(self, world_size: int | None = None) -> RunConfig:
        """Check every section, then the cross-section rules; return self."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        p, m = self.parallel, self.model
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        _check(m.num_query_groups % tp == 0, "parallel.tensor_model_parallel_size", tp,
               f"a divisor of model.num_query_groups={m.num_query_groups}")
        _check(m.ffn_hidden_size % tp == 0, "parallel.tensor_model_parallel_size", tp,
               f"a divisor of model.ffn_hidden_size={m.ffn_hidden_size}")
        if "M" in m.hybrid_layer_pattern:
            heads, groups = m.mamba_heads(), m.mamba_num_groups
            _check(heads % tp == 0 and groups % tp == 0, "parallel.tensor_model_parallel_size",
                   tp, f"a divisor of the {heads} Mamba heads and mamba_num_groups={groups}")
        _check(m.make_vocab_size_divisible_by % tp == 0, "parallel.tensor_model_parallel_size",
               tp, f"a divisor of model.make_vocab_size_divisible_by="
               f"{m.make_vocab_size_divisible_by} (the padded vocabulary is split over TP)")
        self._check_moe()
        if world_size is not None:
            self._check_run_shapes(world_size)
        _check(self.train.eval_interval == 0 or self.data.split_weights()[1] > 0,
               "train.eval_interval", self.train.eval_interval,
               f"0 unless data.split holds out a valid split (data.split={self.data.split!r}, "
               f"e.g. 98,2,0)")
        stages = m.hybrid_layer_pattern.count("|") + 1
        vp = p.virtual_pipeline_model_parallel_size
        # train/ntp_mix.py runs the NTP term as one micro-batch; an interleaved schedule
        # needs a multiple of PP micro-batches.
        _check(vp is None or self.rlp.ntp_loss_coef == 0, "rlp.ntp_loss_coef",
               self.rlp.ntp_loss_coef, "0 with parallel.virtual_pipeline_model_parallel_size set")
        if vp is None:
            _check(stages == 1 or stages == pp, "model.hybrid_layer_pattern",
                   m.hybrid_layer_pattern,
                   f"{pp} pipeline stage(s) (| separated) for pipeline_model_parallel_size={pp}")
        else:
            _check(stages == pp * vp, "model.hybrid_layer_pattern", m.hybrid_layer_pattern,
                   f"{pp * vp} | separated chunks (pipeline_model_parallel_size={pp} x "
                   f"virtual_pipeline_model_parallel_size={vp}), each with at least one layer")
            _check(all(seg for seg in m.hybrid_layer_pattern.split("|")),
                   "model.hybrid_layer_pattern", m.hybrid_layer_pattern,
                   "no empty chunk between | separators")
        if vp is None:
            _check(stages == 1 or all(seg for seg in m.hybrid_layer_pattern.split("|")),
                   "model.hybrid_layer_pattern", m.hybrid_layer_pattern,
                   "no empty pipeline stage between | separators")
        self._check_sequence_lengths()
        self._check_transformer_engine()
        self._check_packed_attention()
        return self

    def _check_moe(self) -> None:
        """MoE against the layout and the objective (the world size is `_check_run_shapes`)."""
        m, p = self.model, self.parallel
        ep, tp = p.expert_model_parallel_size, p.tensor_model_parallel_size
        if "E" not in m.hybrid_layer_pattern:
            _check(ep == 1, "parallel.expert_model_parallel_size", ep,
                   "1 without E (MoE) layers in model.hybrid_layer_pattern")
            return
        _check(m.num_experts % ep == 0, "parallel.expert_model_parallel_size", ep,
               f"a divisor of model.num_experts={m.num_experts}")
        for key in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            v = getattr(m, key)
            _check(v is None or v % tp == 0, "parallel.tensor_model_parallel_size", tp,
                   f"a divisor of model.{key}={v}")
        # Megatron's MoELayer raises in training with TP > 1 and no sequence parallel.
        _check(tp == 1 or p.sequence_parallel, "parallel.sequence_parallel", p.sequence_parallel,
               "true with E (MoE) layers and tensor_model_parallel_size > 1 (Megatron's MoELayer)")
        # Token dropping makes a token's experts depend on the other tokens of its batch:
        # rollout (decode, one token a step) and update (whole sequences) would route apart.
        _check(m.moe_expert_capacity_factor is None or self.train.objective != "rlp",
               "model.moe_expert_capacity_factor", m.moe_expert_capacity_factor,
               "null with train.objective=rlp (exact on-policy routing: no token dropping)")

    def _check_packed_attention(self) -> None:
        """`model.packed_attention=flex` where FlexAttention cannot run the packed update."""
        if self.model.packed_attention != "flex":
            return
        from megatron_rlp.packing import flex

        try:
            flex.resolve("flex", self.device.type, self.model.hybrid_layer_pattern)
        except ValueError as e:
            raise ConfigError(f"invalid config: model.packed_attention='flex' (allowed: auto or "
                              f"mask here; flex needs {e})") from None

    def _check_transformer_engine(self) -> None:
        """`model.transformer_impl` and `precision.fp8` against this machine: TE importable,
        CUDA, the GPU's compute capability (backends/transformer_engine.py)."""
        from megatron_rlp.backends import transformer_engine as te

        m, pr, device = self.model, self.precision, self.device.type
        if m.transformer_impl == "local" and pr.fp8 is None:
            return  # nothing to probe
        # TE is CUDA-only: on CPU it is never imported (auto resolves to local).
        have_te = device == "cuda" and te.transformer_engine_available()
        try:
            impl = te.resolve_transformer_impl(m.transformer_impl, device, have_te)
        except ValueError as e:
            raise ConfigError(f"invalid config: model.transformer_impl={m.transformer_impl!r} "
                              f"(allowed: local or auto here; transformer_engine needs {e})"
                              ) from None
        if pr.fp8 is None:
            return
        missing = te.fp8_requirement(pr.fp8_recipe, device, have_te,
                                     te.cuda_capability() if have_te else None,
                                     te.cuda_version() if have_te else None)
        _check(missing is None, "precision.fp8", pr.fp8,
               f"null here; FP8 (fp8_recipe={pr.fp8_recipe}) needs {missing}")
        _check(impl == "transformer_engine", "precision.fp8", pr.fp8,
               "null with model.transformer_impl=local (FP8 runs only in Transformer Engine "
               "layers; use transformer_impl=auto or transformer_engine)")
        _check(pr.params_dtype == "bf16", "precision.params_dtype", pr.params_dtype,
               f"bf16 with precision.fp8={pr.fp8} (FP8 GEMMs on bf16 weights)")
        _check(not (pr.first_last_layers_bf16 and pr.fp8_recipe == "delayed"),
               "precision.first_last_layers_bf16", pr.first_last_layers_bf16,
               "false with fp8_recipe=delayed (Megatron: delayed scaling cannot leave layers in "
               "bf16; use tensorwise, blockwise or mxfp8)")
        if pr.first_last_layers_bf16:
            layers = sum(c in "M*-E" for c in m.hybrid_layer_pattern)
            stage = layers // self.parallel.pipeline_model_parallel_size
            for key in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
                v = getattr(pr, key)
                _check(v <= stage, f"precision.{key}", v,
                       f"<= {stage} layers per pipeline stage (Megatron's limit)")

    def _check_run_shapes(self, world_size: int) -> None:
        """The run-time constraints that depend on the world size, checked here so that a
        run never stops at step 1 over them. Each names the code that would fail:

        - TP x PP divides the world; DP = world / (TP x PP) divides the global batches
          (`rlp_step.local_contexts`, `ntp_step`, `validate.validate` slice them evenly);
        - `train.micro_batch_size` divides the sequences of a rank (`update.split_microbatches`),
          and under an interleaved pipeline gives a multiple of PP micro-batches (Megatron's
          `forward_backward_pipelining_with_interleaving` asserts it);
        - a document's contexts stay on one rank (`data/batches.py` rebuilds their shared
          window from the contexts a rank holds, starting max_prefix_tokens before the first
          position; split, the prefixes would depend on DP).
        """
        p, r, t = self.parallel, self.rlp, self.train
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        _check(isinstance(world_size, int) and world_size >= 1 and world_size % (tp * pp) == 0,
               "parallel.tensor_model_parallel_size", tp,
               f"TP*PP dividing the world size {world_size} (pipeline_model_parallel_size={pp})")
        dp = world_size // (tp * pp)
        ep = p.expert_model_parallel_size
        _check(dp % ep == 0, "parallel.expert_model_parallel_size", ep,
               f"EP*TP*PP dividing the world size {world_size} (EP a divisor of the "
               f"data-parallel size {dp}; tensor_model_parallel_size={tp}, "
               f"pipeline_model_parallel_size={pp})")
        _check(r.contexts_per_step % dp == 0, "rlp.contexts_per_step", r.contexts_per_step,
               f"a multiple of the data-parallel size {dp}")
        _check(self.data.ntp_batch_size % dp == 0, "data.ntp_batch_size",
               self.data.ntp_batch_size, f"a multiple of the data-parallel size {dp}")
        _check(t.eval_interval == 0 or t.eval_contexts % dp == 0, "train.eval_contexts",
               t.eval_contexts, f"a multiple of the data-parallel size {dp}")
        local = r.contexts_per_step // dp
        if t.objective == "rlp":
            _check(local % r.positions_per_document == 0, "rlp.positions_per_document",
                   r.positions_per_document,
                   f"a divisor of the {local} contexts per data-parallel rank (contexts_per_step"
                   f"={r.contexts_per_step} / DP={dp}): one document's contexts share a window "
                   "and stay on one rank")
            # Rollout chunks need no check: a chunk of more contexts than a rank holds is one
            # chunk of all of them (thoughts.sample_thoughts_chunked), so a chunk size set for
            # a small job stays valid when the job grows; keyed sampling makes the thoughts
            # independent of the chunking.
            sequences, what = local * r.group_size, (
                f"{local} contexts x group_size={r.group_size} thoughts")
        else:
            sequences = self.data.ntp_batch_size // dp
            what = f"data.ntp_batch_size={self.data.ntp_batch_size} / DP={dp}"
        mbs = t.micro_batch_size
        _check(sequences % (mbs or sequences) == 0, "train.micro_batch_size", mbs,
               f"0 or a divisor of the {sequences} sequences per data-parallel rank ({what})")
        if p.virtual_pipeline_model_parallel_size is not None:
            count = sequences // (mbs or sequences)
            _check(count % pp == 0, "train.micro_batch_size", mbs,
                   f"a size giving a multiple of pipeline_model_parallel_size={pp} micro-batches "
                   f"(interleaved pipeline; {sequences} sequences per data-parallel rank)")

    def _check_sequence_lengths(self) -> None:
        """The longest sequence a run builds fits `model.max_sequence_length`: a rollout is
        prefix + `<think>` + thought (`</think>` included) + the `</think>` a cut-off thought
        is given (`rollout/thoughts.py` sizes its KV cache so); NTP windows are
        `data.ntp_seq_length` long. Evaluation samples thoughts in NTP runs too."""
        m, r = self.model, self.rlp
        extra, extra_what = 0, ""
        if r.thought_template != "none":  # the template's instruction and forced tokens
            from megatron_rlp.rollout.template import template_token_count

            extra = template_token_count(r.thought_template, self.data.tokenizer)
            extra_what = f" + {extra} rlp.thought_template tokens"
        needs = []
        if self.train.objective == "rlp" and r.positions_per_document > 1:
            # Contexts of one document share a window longer than max_prefix_tokens (issue 11):
            # the last position's prefix spans it.
            needs.append((r.max_window_tokens() + r.max_thought_tokens + 2 + extra,
                          f"the longest document window, {r.max_window_tokens()} tokens with "
                          f"rlp.positions_per_document={r.positions_per_document}, + <think> + "
                          "rlp.max_thought_tokens + </think>" + extra_what))
        if self.train.objective == "rlp" or self.train.eval_interval:
            # Evaluation draws one position per document: windows of max_prefix_tokens.
            needs.append((r.max_prefix_tokens + r.max_thought_tokens + 2 + extra,
                          "rlp.max_prefix_tokens + <think> + rlp.max_thought_tokens + </think>"
                          + extra_what))
        if self.train.objective == "ntp":
            needs.append((self.data.ntp_seq_length, "data.ntp_seq_length"))
        for need, what in needs:
            _check(m.max_sequence_length >= need, "model.max_sequence_length",
                   m.max_sequence_length, f">= {need} ({what})")
        p = self.parallel
        if self.train.objective == "ntp" and p.sequence_parallel:
            # The NTP update feeds whole windows; sequence parallel splits them over TP.
            _check(self.data.ntp_seq_length % p.tensor_model_parallel_size == 0,
                   "data.ntp_seq_length", self.data.ntp_seq_length,
                   f"a multiple of tensor_model_parallel_size={p.tensor_model_parallel_size} "
                   "with parallel.sequence_parallel=true")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Loading: YAML + overrides -> typed dataclasses (unknown keys and wrong types are errors)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        # A YAML list, or one string split on whitespace (`data.blend="0.7 a 0.3 b"`).
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: a non-empty list or "
                              f"a space-separated string)")
        out = []
        for item in items:
            if isinstance(item, (dict, list, tuple)) or item is None:
                raise ConfigError(f"invalid config: {key}={value!r} (allowed: a list of scalars)")
            out += str(item).split()
        return out
    if origin is Literal:
        allowed = ", ".join(repr(a) for a in args)
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise ConfigError(f"invalid config: {key}={value!r} (allowed: one of {allowed})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"invalid config: {key}={value!r} (allowed: true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: an integer)")
        try:
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value, 0)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, int):
                return value
        except ValueError:
            pass
        raise ConfigError(f"invalid config: {key}={value!r} (allowed: an integer)")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: a number)")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: a number)") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: a string)")
        return str(value)
    raise ConfigError(f"invalid config: {key} has unsupported type {tp}")


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(cfg: RunConfig, key: str, value: Any) -> None:
    """Set `section.key` on cfg from a raw value (YAML scalar or CLI string)."""
    parts = key.split(".")
    top = _section_types(RunConfig)
    if parts[0] not in top:
        raise ConfigError(f"invalid config: unknown section {parts[0]!r} in {key!r} "
                          f"(allowed: {', '.join(top)})")
    section = getattr(cfg, parts[0])
    hints = _section_types(type(section))
    if len(parts) == 1 and parts[0] == "device" and isinstance(value, str):
        parts = ["device", "type"]  # `device: cpu` is shorthand for `device.type: cpu`
    if len(parts) != 2:
        raise ConfigError(f"invalid config: {key!r} (allowed: section.key, e.g. rlp.group_size)")
    if parts[1] not in hints:
        raise ConfigError(f"invalid config: unknown key {key!r} (allowed in {parts[0]}: "
                          f"{', '.join(hints)})")
    setattr(section, parts[1], _coerce(value, hints[parts[1]], key))


def _flatten(data: dict) -> list[tuple[str, Any]]:
    items = []
    for sec, body in data.items():
        if isinstance(body, dict):
            items += [(f"{sec}.{k}", v) for k, v in body.items()]
        else:
            items.append((str(sec), body))
    return items


def load_config(path: str | None = None, overrides: tuple[str, ...] = (),
                world_size: int | None = None) -> RunConfig:
    """Build a validated RunConfig from defaults, an optional YAML file and overrides.

    Args:
        path: YAML file with sections as top-level keys (any subset).
        overrides: `section.key=value` strings, applied after the file.
        world_size: when known, also check divisibility by the data-parallel size.
    """
    cfg = RunConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"invalid config: file {path!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid config: {path} is not valid YAML ({e.__class__.__name__}: "
                              f"{str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"invalid config: {path} must map section names to settings")
        for key, value in _flatten(data):
            _apply(cfg, key, value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"invalid override {item!r} (allowed: section.key=value)")
        key, value = item.split("=", 1)
        # Raw strings, not YAML: a pattern such as `*-*-` would read as a YAML alias.
        _apply(cfg, key.strip(), value.strip())
    if cfg.train.use_checkpoint_args:
        _use_checkpoint_args(cfg)
    # Validation imports some of the package's modules (window lengths, templates, blends,
    # TE probing), which import Megatron-Core; its import-time notices (TE/Apex missing, no
    # CUDA runtime) would come before a one-line config error.
    with _quiet_imports():
        return cfg.validate(world_size)


@contextlib.contextmanager
def _quiet_imports():
    """Warnings and torch's cpp_extension log notice silenced for the block."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def launch_env(env: typing.Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(world size, global rank, local rank) of this process, from its launcher.

    torchrun sets WORLD_SIZE / RANK / LOCAL_RANK. `srun` starting one process per task sets
    SLURM_STEP_NUM_TASKS (or SLURM_NTASKS / SLURM_NPROCS) / SLURM_PROCID / SLURM_LOCALID; those
    count only inside a job step (SLURM_STEP_ID), not in the batch script itself. Otherwise
    the process is alone: (1, 0, 0).
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "RANK" in env:
        return (int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0")),
                int(env.get("LOCAL_RANK", "0")))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        for key in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"):
            if env.get(key, "").isdigit():
                return int(env[key]), int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0"))
    return 1, 0, 0


def _use_checkpoint_args(cfg: RunConfig) -> None:
    """The model section from a Megatron-LM checkpoint's args (interop/megatron_lm.py)."""
    from megatron_rlp.interop import megatron_lm

    try:
        megatron_lm.apply_checkpoint_args(cfg)
    except (megatron_lm.MegatronLMError, OSError) as e:
        text = str(e)
        if not text.startswith("train.use_checkpoint_args"):
            text = f"train.use_checkpoint_args=true: {text}"
        raise ConfigError(f"invalid config: {text}") from None


def let_rank0_print(seconds: float = 3.0) -> None:
    """On a rank other than 0 that is about to exit over an error rank 0 prints: wait a moment
    first. torchrun stops the whole job as soon as one worker exits non-zero, and a rank that
    exited at once could get rank 0 killed before its `error:` line is out."""
    time.sleep(seconds)


def load_launch_config(path: str | None, overrides: tuple[str, ...]) -> RunConfig:
    """`load_config` for an entry point under torchrun or srun (world size from `launch_env`),
    before torch.distributed starts. A bad value prints one `error:` line, from global rank 0
    only (every rank of a job reads the same config), and every rank exits 2."""
    world, rank, local_rank = launch_env()
    try:
        cfg = load_config(path, overrides, world_size=world)
        if cfg.device.type == "cuda":
            import torch

            visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
            _check(local_rank < visible, "device.type", cfg.device.type,
                   f"cpu: this process (local rank {local_rank}) sees {visible} CUDA device(s)")
        if world > 1 and "WORLD_SIZE" not in os.environ:  # srun: env:// rendezvous
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise ConfigError(f"invalid launch: srun started {world} tasks but "
                                  f"{' and '.join(missing)} is not set (allowed: export "
                                  "MASTER_ADDR=<first node> MASTER_PORT=<free port>, or "
                                  "launch with torchrun)")
        return cfg
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            let_rank0_print()
        raise SystemExit(2) from None
