"""The model's sections: architecture (`model`), Megatron parallel layout (`parallel`) and
precision (`precision`). Each section checks its own values; rules across sections are in
`config/run.py`, and those that need the machine (TE, CUDA, FlexAttention) in
`megatron_rlp/startup.py`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from megatron_rlp.config.errors import check


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture. Dense Qwen3-style models are HybridModel patterns of `*` (attention) and
    `-` (MLP) layers; `M` adds Mamba-2 layers (hybrid models), `E` mixture-of-experts layers
    (Qwen3-MoE, Nemotron 3; the `num_experts` and `moe_*` keys, docs/moe.md)."""

    name: str = "tiny"
    """A label for the model (recipes name their size here); printed and saved, never parsed."""
    hybrid_layer_pattern: str = "*-*-*-*-"
    """The layers, one character each, as Megatron's HybridModel pattern: `*` attention, `-`
    MLP, `M` Mamba-2, `E` mixture of experts; `|` splits pipeline stages (PP, or PP x VP
    chunks with an interleaved pipeline). The number of layers is the number of `M`, `*`, `-`
    and `E` characters."""
    hidden_size: int = 192
    """Hidden size (Megatron-LM `--hidden-size`)."""
    ffn_hidden_size: int = 512
    """MLP intermediate size (`--ffn-hidden-size`); a multiple of the TP size."""
    num_attention_heads: int = 6
    """Attention query heads (`--num-attention-heads`)."""
    num_query_groups: int = 2
    """Key/value heads of grouped-query attention (`--num-query-groups`); a divisor of
    `num_attention_heads` and a multiple of the TP size."""
    kv_channels: int | None = None
    """Head dimension (`--kv-channels`); null = hidden_size // num_attention_heads."""
    qk_layernorm: bool = True
    """Normalize queries and keys per head before attention, as Qwen3 (`--qk-layernorm`)."""
    activation: Literal["swiglu", "squared_relu", "gelu"] = "swiglu"
    """MLP activation: `swiglu` (`--swiglu`), `squared_relu` (`--squared-relu`, Nemotron-H) or
    `gelu` (Megatron's default)."""
    position_embedding_type: Literal["rope", "none"] = "rope"
    """`rope` (rotary, `--position-embedding-type rope`) or `none` (hybrid models whose Mamba
    layers carry the position)."""
    rotary_base: int = 1_000_000
    """RoPE base theta (`--rotary-base`)."""
    untie_embeddings_and_output_weights: bool = False
    """A separate output layer instead of the input embedding's transpose
    (`--untie-embeddings-and-output-weights`)."""
    max_sequence_length: int = 512
    """Longest sequence in tokens the model serves (`--max-position-embeddings`, RoPE table);
    checked at start-up against the longest rollout and update sequence of the `rlp`
    section."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Norm layers (`--normalization`)."""
    norm_epsilon: float = 1e-6
    """Epsilon of the norm layers (`--norm-epsilon`); > 0."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialization (`--init-method-std`); > 0."""
    make_vocab_size_divisible_by: int = 64
    """The embedding's vocabulary is padded to a multiple of this
    (`--make-vocab-size-divisible-by`; unlike Megatron-LM, not also multiplied by the TP size,
    so every TP layout has the same weights); a multiple of the TP size."""
    mamba_num_heads: int | None = None
    """Mamba-2 heads (`M` layers only; `--mamba-num-heads`); null = 2 * hidden_size /
    mamba_head_dim. Megatron's conv width 4 and chunk size 128 apply."""
    mamba_head_dim: int = 64
    """Mamba-2 head dimension (`--mamba-head-dim`)."""
    mamba_state_dim: int = 128
    """Mamba-2 SSM state size per head (`--mamba-state-dim`)."""
    mamba_num_groups: int = 8
    """Mamba-2 B/C groups (`--mamba-num-groups`); a divisor of the Mamba heads."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation (Megatron-LM `--transformer-impl`): `local` = Megatron's own torch
    modules (models/local_spec.py, any device), `transformer_engine` = Megatron's TE spec
    (models/te_spec.py: fused norm+linear, TE attention; CUDA + TE), `auto` = TE when it
    imports and device.type=cuda, else local."""
    packed_attention: Literal["auto", "flex", "mask", "split"] = "auto"
    """Core attention of the branch-packed update (packing/flex.py): `flex` = FlexAttention
    with a BlockMask (block-sparse, compiled, on CUDA; an eager fallback on CPU for tests),
    `mask` = the explicit [B, 1, S, S] tree mask through Megatron's attention, `split` = the
    window causally and each branch against its prefix and itself, only the pairs the tree
    reads (packing/split_attention.py), `auto` = flex on CUDA for attention-only patterns,
    split on CPU, else mask. See docs/performance.md."""
    num_experts: int | None = None
    """Routed experts of every `E` (MoE) layer (`--num-experts`); required with `E` layers,
    null without. The experts are Megatron's MoELayer (models/moe.py)."""
    moe_router_topk: int = 2
    """Experts each token is routed to (`--moe-router-topk`); in [1, num_experts]."""
    moe_ffn_hidden_size: int | None = None
    """One routed expert's FFN width (`--moe-ffn-hidden-size`); null = ffn_hidden_size."""
    moe_shared_expert_intermediate_size: int | None = None
    """FFN width of the shared expert every token also runs through
    (`--moe-shared-expert-intermediate-size`); null = no shared expert."""
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss",
                                            "none"] = "aux_loss"
    """Load-balancing loss (`--moe-router-load-balancing-type`): `aux_loss` (Switch/GShard, per
    micro-batch), `seq_aux_loss` (per sequence, DeepSeek-V3 / Nemotron 3), `global_aux_loss`
    (over the global batch) or `none`."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss in the update's loss (`--moe-aux-loss-coeff`); >= 0."""
    moe_z_loss_coeff: float | None = None
    """Weight of the router z-loss (ST-MoE; `--moe-z-loss-coeff`); null = off."""
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores (`--moe-router-score-function`): `softmax` (Qwen3-MoE) or `sigmoid`
    (DeepSeek-V3, Nemotron 3)."""
    moe_router_pre_softmax: bool = False
    """Softmax over all experts before the top-k (`--moe-router-pre-softmax`); false = top-k
    of the logits, then softmax over those k (Qwen3's normalised top-k probabilities)."""
    moe_router_topk_scaling_factor: float | None = None
    """Scale of the routed experts' weights (`--moe-router-topk-scaling-factor`, the HF
    `routed_scaling_factor`); null = 1."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing (`--moe-router-enable-expert-bias`): a per-expert bias added to
    the scores for the top-k choice only, moved after each update by the token counts."""
    moe_router_bias_update_rate: float = 1e-3
    """Step of the expert-bias update (`--moe-router-bias-update-rate`); > 0."""
    moe_router_dtype: Literal["fp32", "fp64"] | None = None
    """Router computation dtype (`--moe-router-dtype`); null = the params dtype."""
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach their experts' ranks under expert parallelism
    (`--moe-token-dispatcher-type`); `alltoall` runs on gloo (CPU) too."""
    moe_expert_capacity_factor: float | None = None
    """Token dropping (`--moe-expert-capacity-factor`): null = none. Refused with RLP: a
    token's experts would depend on the other tokens of its batch, so rollout (decode) and
    update (full sequences) would route apart (docs/moe.md)."""

    def validate(self) -> None:
        pat = self.hybrid_layer_pattern
        # The other HybridModel kinds (G, D, +, ...) need layer specs this package does not ship.
        check(set(pat) <= set("M*-E|") and any(c in "M*-E" for c in pat) and "||" not in pat,
              "model.hybrid_layer_pattern", pat,
              "a non-empty string of M (Mamba-2), * (attention), - (MLP) and E (MoE) layers, "
              "| between pipeline stages")
        if "M" in pat:
            self._validate_mamba()
        self._validate_moe()
        for key in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                    "max_sequence_length", "make_vocab_size_divisible_by"):
            v = getattr(self, key)
            check(isinstance(v, int) and v > 0, f"model.{key}", v, "a positive integer")
        heads = self.num_attention_heads
        check(heads % self.num_query_groups == 0, "model.num_query_groups",
              self.num_query_groups, f"a divisor of num_attention_heads={heads}")
        check(self.kv_channels is None or self.kv_channels > 0, "model.kv_channels",
              self.kv_channels, "a positive integer or null")
        if self.kv_channels is None:
            check(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
                  self.hidden_size, "a multiple of num_attention_heads (or set kv_channels)")
        check(self.norm_epsilon > 0, "model.norm_epsilon", self.norm_epsilon, "> 0")
        check(self.init_method_std > 0, "model.init_method_std", self.init_method_std, "> 0")

    def _validate_moe(self) -> None:
        """The MoE keys: only with `E` layers, and the combinations Megatron would assert on
        deep inside (or silently accept) refused here."""
        pat, n = self.hybrid_layer_pattern, self.num_experts
        if "E" not in pat:
            check(n is None, "model.num_experts", n,
                  "null without E layers in model.hybrid_layer_pattern")
            return
        check(isinstance(n, int) and n >= 1, "model.num_experts", n,
              "an integer >= 1 with E layers in model.hybrid_layer_pattern")
        k = self.moe_router_topk
        check(isinstance(k, int) and 1 <= k <= n, "model.moe_router_topk", k,
              f"an integer in [1, num_experts={n}]")
        for key in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            v = getattr(self, key)
            check(v is None or v > 0, f"model.{key}", v, "a positive integer or null")
        check(0 <= self.moe_aux_loss_coeff < math.inf, "model.moe_aux_loss_coeff",
              self.moe_aux_loss_coeff, "a finite number >= 0")
        check(self.moe_aux_loss_coeff == 0 or self.moe_router_load_balancing_type != "none",
              "model.moe_aux_loss_coeff", self.moe_aux_loss_coeff,
              "0 with moe_router_load_balancing_type=none")
        z = self.moe_z_loss_coeff
        check(z is None or 0 <= z < math.inf, "model.moe_z_loss_coeff", z,
              "null or a finite number >= 0")
        f = self.moe_router_topk_scaling_factor
        check(f is None or 0 < f < math.inf, "model.moe_router_topk_scaling_factor", f,
              "null or a finite number > 0")
        # Megatron's TransformerConfig: a softmax over one chosen expert has zero gradient.
        check(k != 1 or self.moe_router_score_function != "softmax"
              or self.moe_router_pre_softmax, "model.moe_router_topk", k,
              "> 1 with the softmax router unless moe_router_pre_softmax=true (Megatron's rule)")
        check(not self.moe_router_pre_softmax or self.moe_router_score_function == "softmax",
              "model.moe_router_pre_softmax", self.moe_router_pre_softmax,
              "false with moe_router_score_function=sigmoid")
        check(0 < self.moe_router_bias_update_rate < math.inf,
              "model.moe_router_bias_update_rate", self.moe_router_bias_update_rate, "> 0")
        c = self.moe_expert_capacity_factor
        check(c is None or 0 < c < math.inf, "model.moe_expert_capacity_factor", c,
              "null (no token dropping) or a finite number > 0")

    def mamba_heads(self) -> int:
        """Mamba-2 heads: `mamba_num_heads`, or Megatron's default 2 * hidden / head_dim."""
        if self.mamba_num_heads is not None:
            return self.mamba_num_heads
        return 2 * self.hidden_size // self.mamba_head_dim

    def _validate_mamba(self) -> None:
        for key in ("mamba_head_dim", "mamba_state_dim", "mamba_num_groups"):
            v = getattr(self, key)
            check(isinstance(v, int) and v > 0, f"model.{key}", v, "a positive integer")
        if self.mamba_num_heads is None:
            check(2 * self.hidden_size % self.mamba_head_dim == 0, "model.mamba_head_dim",
                  self.mamba_head_dim, f"a divisor of 2 * hidden_size={2 * self.hidden_size} "
                  "(or set mamba_num_heads)")
        else:
            check(self.mamba_num_heads > 0, "model.mamba_num_heads", self.mamba_num_heads,
                  "a positive integer or null")
        heads = self.mamba_heads()
        check(heads % self.mamba_num_groups == 0, "model.mamba_num_groups",
              self.mamba_num_groups, f"a divisor of the {heads} Mamba heads")


@dataclass(kw_only=True)
class ParallelConfig:
    """Megatron parallel layout. Data parallel size is world_size / (TP * PP)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size TP (`--tensor-model-parallel-size`); >= 1."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size PP (`--pipeline-model-parallel-size`); >= 1. With PP > 1,
    `model.hybrid_layer_pattern` names the stages with `|` (or is split evenly)."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Interleaved pipeline (`--num-virtual-stages-per-pipeline-rank`): each rank holds this
    many model chunks; null = one. The layer pattern names the PP x VP chunks with `|`; chunk
    i of rank r is segment i*PP + r. An integer >= 2, with PP >= 2."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (`--sequence-parallel`); true only with TP > 1."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state over data-parallel ranks (`--use-distributed-optimizer`)."""
    expert_model_parallel_size: int = 1
    """Expert parallelism EP (`--expert-model-parallel-size`): each `E` layer's experts split
    over this many data-parallel ranks (expert tensor parallelism = TP); a divisor of
    `model.num_experts` and of the data-parallel size (EP x TP x PP divides the world)."""

    def validate(self) -> None:
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                    "expert_model_parallel_size"):
            v = getattr(self, key)
            check(isinstance(v, int) and v >= 1, f"parallel.{key}", v, "an integer >= 1")
        vp = self.virtual_pipeline_model_parallel_size
        check(vp is None or (isinstance(vp, int) and vp >= 2 and
                              self.pipeline_model_parallel_size >= 2),
               "parallel.virtual_pipeline_model_parallel_size", vp,
               "null, or an integer >= 2 with pipeline_model_parallel_size >= 2")
        check(not self.sequence_parallel or self.tensor_model_parallel_size > 1,
              "parallel.sequence_parallel", self.sequence_parallel,
              "true only with tensor_model_parallel_size > 1")


@dataclass(kw_only=True)
class PrecisionConfig:
    """Parameter/compute dtype; FP8 (Transformer Engine, Hopper) is for device=cuda only.
    The EMA teacher is always fp32."""

    params_dtype: Literal["fp32", "bf16"] = "fp32"
    """Parameter and compute dtype of the policy (`bf16` = Megatron-LM `--bf16`: Float16Module
    with fp32 main weights in the optimizer); on cpu and cuda. The EMA teacher stays fp32."""
    fp8: Literal["hybrid", "e4m3"] | None = None
    """FP8 format through Megatron's TransformerConfig (`--fp8-format`): `e4m3`, `hybrid`
    (e4m3 forward, e5m2 gradients) or null = off. Transformer Engine layers on CUDA only
    (requirements in backends/transformer_engine.py); see docs/precision_and_hardware.md."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """FP8 scaling recipe (`--fp8-recipe`); must stay `delayed` unless `fp8` is set."""
    fp8_param_gather: bool = False
    """Keep parameters in FP8 and all-gather them in FP8 (`--fp8-param-gather`:
    TransformerConfig.fp8_param + DDP fp8_param_gather). Refused for now: the model is built
    on the CPU, where Transformer Engine cannot quantise it (models/fp8.py)."""
    first_last_layers_bf16: bool = False
    """Keep the first/last layers (global layer numbers) in bf16 under FP8
    (`--first-last-layers-bf16`); only with `fp8` set, not with the delayed recipe (Megatron
    refuses it)."""
    num_layers_at_start_in_bf16: int = 1
    """Layers at the start kept in bf16 with `first_last_layers_bf16`
    (`--num-layers-at-start-in-bf16`); >= 0."""
    num_layers_at_end_in_bf16: int = 1
    """Layers at the end kept in bf16 with `first_last_layers_bf16`
    (`--num-layers-at-end-in-bf16`); >= 0."""
    fp8_rollouts: bool = False
    """Rollouts (and the teacher's scoring) under the FP8 autocast too. false = they run in
    bf16 even when training in FP8: the forward runs with FP8 switched off (models/fp8.py).
    Refused for now: decode steps and prefills give row counts FP8 GEMMs cannot take
    (models/fp8.py)."""

    def validate(self) -> None:
        for key in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            v = getattr(self, key)
            check(isinstance(v, int) and v >= 0, f"precision.{key}", v, "an integer >= 0")
        if self.fp8 is None:
            for key in ("fp8_param_gather", "first_last_layers_bf16", "fp8_rollouts"):
                check(not getattr(self, key), f"precision.{key}", getattr(self, key),
                      "false unless precision.fp8 is set (e4m3 or hybrid)")
            check(self.fp8_recipe == "delayed", "precision.fp8_recipe", self.fp8_recipe,
                  "the default (delayed) unless precision.fp8 is set (e4m3 or hybrid)")
        else:
            # models/fp8.py, "What FP8 refuses", says why and what lifting each would take.
            check(not self.fp8_param_gather, "precision.fp8_param_gather",
                  self.fp8_param_gather,
                  "false: the model is built on the CPU (use_cpu_initialization, identical "
                  "weights in every layout) and moved to the GPU after, so Transformer Engine's "
                  "fp8_model_init would quantise CPU parameters; FP8 weights need a build on "
                  "the device, which this project does not have yet (FP8 compute works without "
                  "it)")
            check(not self.fp8_rollouts, "precision.fp8_rollouts", self.fp8_rollouts,
                  "false: Transformer Engine's FP8 GEMMs need row counts that are multiples "
                  "of 16, and rollout decode steps (rows left after compaction) and prefills "
                  "(unpadded prompts) give any count; rollouts run in bf16 under FP8 "
                  "training, at no cost to the ratio (the update recomputes logp_old)")
        # The FP8 rules that need the machine (TE, GPU) are in startup.check_machine.

