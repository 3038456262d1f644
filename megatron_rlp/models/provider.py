"""Model provider: RunConfig -> Megatron `TransformerConfig` -> `HybridModel`.

Dense (Qwen3-style) and hybrid (Nemotron-H-style) models are both Megatron `HybridModel`s;
the layer pattern says which layers exist (`*` attention, `-` MLP, `M` Mamba-2, `E` MoE). The
Megatron-LM entry scripts call this split "model provider"; it is the one place that knows
how config keys become Megatron arguments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.activations import squared_relu
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_rlp.backends.transformer_engine import (
    resolve_transformer_impl,
    transformer_engine_available,
)
from megatron_rlp.config import RunConfig
from megatron_rlp.models.fp8 import transformer_config_fp8
from megatron_rlp.models.local_spec import local_hybrid_stack_spec
from megatron_rlp.models.masked_attention import route_explicit_masks
from megatron_rlp.models.moe import transformer_config_moe
from megatron_rlp.models.seeded_init import seed_generator, seed_layers_by_number
from megatron_rlp.models.vocab import padded_vocab_size
from megatron_rlp.parallel.pipeline import ModelChunks


def squared_relu_eager(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2, Nemotron-H's MLP activation (Megatron's `squared_relu`, uncompiled)."""
    return torch.pow(F.relu(x), 2)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip Megatron DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def num_layers(pattern: str) -> int:
    return sum(1 for c in pattern if c in "M*-E")


def transformer_impl(cfg: RunConfig) -> str:
    """`model.transformer_impl` resolved on this machine: `local` or `transformer_engine`."""
    on_cuda = cfg.device.type == "cuda"
    return resolve_transformer_impl(cfg.model.transformer_impl, cfg.device.type,
                                    on_cuda and transformer_engine_available())


def layer_spec(cfg: RunConfig) -> ModuleSpec:
    """The HybridStack spec for this run: the one place local vs Transformer Engine is chosen."""
    m = cfg.model
    if transformer_impl(cfg) == "transformer_engine":
        from megatron_rlp.models.te_spec import te_hybrid_stack_spec

        return te_hybrid_stack_spec(m.qk_layernorm)
    return local_hybrid_stack_spec(m.qk_layernorm, m.normalization)


def transformer_config(cfg: RunConfig, params_dtype: str | None = None) -> TransformerConfig:
    """Translate the model/parallel/precision sections into Megatron's TransformerConfig.

    `params_dtype` ("fp32" | "bf16") overrides `precision.params_dtype`: the EMA teacher is
    an fp32 model whatever the policy's precision, and builds from its own config so that
    every dtype Megatron derives from it (attention softmax, Mamba input cast, pipeline
    receive buffers) agrees with its fp32 weights.
    """
    m, p = cfg.model, cfg.parallel
    on_cpu = cfg.device.type == "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[params_dtype
                                                            or cfg.precision.params_dtype]
    activation = {
        "swiglu": (F.silu, True),
        # Megatron's squared_relu is torch.compile'd; on CPU use the same function eagerly
        # (no C++ toolchain needed, and dynamo trips over the CPU backend's torch.cuda stubs).
        "squared_relu": (squared_relu_eager if on_cpu else squared_relu, False),
        "gelu": (F.gelu, False),
    }[m.activation]
    return TransformerConfig(
        num_layers=num_layers(m.hybrid_layer_pattern),
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        qk_layernorm=m.qk_layernorm,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        activation_func=activation[0],
        gated_linear_unit=activation[1],
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        # Full weights are drawn on the CPU from one seed, then split: every TP/PP layout
        # starts from identical parameters (the basis of the equivalence tests). On CUDA the
        # built modules are then moved to the rank's device (train/builder.py).
        use_cpu_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Every micro-batch of an update has the step's padded length, passed to the schedule.
        variable_seq_lengths=False,
        # The interleaved schedule sends to both neighbours at once; with PP=2 they are the same
        # rank, and batched isend/irecv pairs the two directions' messages in posting order
        # (gloo: wrong tensors). Megatron's unbatched ops keep the directions apart (one
        # process group each), as Megatron-LM's default overlap_p2p_comm does.
        batch_p2p_comm=p.virtual_pipeline_model_parallel_size is None,
        # Fused CUDA kernels and TE-only paths off where they cannot run.
        bias_dropout_fusion=not on_cpu,
        # Off on GPU too: for `causal` layers the fused kernel ignores the explicit masks
        # RLP passes (left padding, decode rows, the packed update's tree), and it needs
        # Apex's compiled extensions. The torch softmax path applies the given mask.
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        recompute_granularity=(None if cfg.train.recompute_granularity == "none"
                               else cfg.train.recompute_granularity),
        recompute_method="uniform" if cfg.train.recompute_granularity == "full" else None,
        recompute_num_layers=(cfg.train.recompute_num_layers
                              if cfg.train.recompute_granularity == "full" else None),
        mamba_num_heads=m.mamba_num_heads,
        mamba_head_dim=m.mamba_head_dim,
        mamba_state_dim=m.mamba_state_dim,
        mamba_num_groups=m.mamba_num_groups,
        expert_model_parallel_size=p.expert_model_parallel_size,
        **transformer_config_moe(m, transformer_impl(cfg) == "transformer_engine"),
        **transformer_config_fp8(cfg.precision),  # FP8 fields, only when precision.fp8 is set
    )


def build_model(cfg: RunConfig, vocab_size: int, pre_process: bool = True,
                post_process: bool = True, vp_stage: int | None = None,
                config: TransformerConfig | None = None) -> HybridModel:
    """Build this rank's shard of the model (`vocab_size` is the tokenizer's, unpadded), or
    its chunk `vp_stage` under an interleaved pipeline."""
    m = cfg.model
    config = config or transformer_config(cfg)
    spec = layer_spec(cfg)
    seed_generator(cfg.train.seed)  # embedding (first stage) and output layer (after the layers)
    model = HybridModel(
        config=config,
        hybrid_stack_spec=seed_layers_by_number(spec, cfg.train.seed),
        vocab_size=padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by),
        max_sequence_length=m.max_sequence_length,
        hybrid_layer_pattern=m.hybrid_layer_pattern,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type,
        rotary_base=m.rotary_base,
        vp_stage=vp_stage,
    )
    if transformer_impl(cfg) == "transformer_engine":
        route_explicit_masks(model)  # TE's causal core attention ignores explicit masks
    return model


def build_stage(cfg: RunConfig, vocab_size: int, params_dtype: str | None = None
                ) -> HybridModel | ModelChunks:
    """This rank's part of the model under the initialised parallel layout: its pipeline
    stage, or (interleaved pipeline) its chunks, sharing one TransformerConfig as Megatron's
    schedules expect. `params_dtype` overrides `precision.params_dtype` (see
    `transformer_config`). Parameters are on the CPU (`use_cpu_initialization`)."""
    vp = cfg.parallel.virtual_pipeline_model_parallel_size
    config = transformer_config(cfg, params_dtype)
    if vp is None:
        return build_model(cfg, vocab_size, config=config,
                           pre_process=parallel_state.is_pipeline_first_stage(),
                           post_process=parallel_state.is_pipeline_last_stage())
    return ModelChunks(
        build_model(cfg, vocab_size, config=config, vp_stage=i,
                    pre_process=parallel_state.is_pipeline_first_stage(False, vp_stage=i),
                    post_process=parallel_state.is_pipeline_last_stage(False, vp_stage=i))
        for i in range(vp))
