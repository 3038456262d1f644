"""The model's sections: architecture (`model`), Megatron parallel layout (`parallel`) and
precision (`precision`). Each section checks its own values; rules across sections are in
`config/run.py`, and those that need the machine (TE, CUDA, FlexAttention) in
`megatron_rlp/startup.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_rlp.config.errors import check


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

    def validate(self) -> None:
        pat = self.hybrid_layer_pattern
        # `E` (MoE) and the other HybridModel kinds need layer specs this package does not ship.
        check(set(pat) <= set("M*-|") and any(c in "M*-" for c in pat) and "||" not in pat,
              "model.hybrid_layer_pattern", pat,
              "a non-empty string of M (Mamba-2), * (attention) and - (MLP) layers, "
              "| between pipeline stages")
        if "M" in pat:
            self._validate_mamba()
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
    pipeline_model_parallel_size: int = 1
    # Interleaved pipeline: each rank holds this many model chunks (null = one). The layer
    # pattern names the PP x VP chunks with `|`; chunk i of rank r is segment i*PP + r.
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False

    def validate(self) -> None:
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
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
            check(isinstance(v, int) and v >= 0, f"precision.{key}", v, "an integer >= 0")
        if self.fp8 is None:
            for key in ("fp8_param_gather", "first_last_layers_bf16", "fp8_rollouts"):
                check(not getattr(self, key), f"precision.{key}", getattr(self, key),
                      "false unless precision.fp8 is set (e4m3 or hybrid)")
            check(self.fp8_recipe == "delayed", "precision.fp8_recipe", self.fp8_recipe,
                  "the default (delayed) unless precision.fp8 is set (e4m3 or hybrid)")
        # The FP8 rules that need the machine (TE, GPU) are in startup.check_machine.

