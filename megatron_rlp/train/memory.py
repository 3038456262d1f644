"""Per-rank memory estimate of an RLP run: a config, a world size, the layout in it.

The command line is `tools/estimate_memory.py`; start-up uses `estimate` to refuse a launch
that cannot fit (`startup`). For example:

    python tools/estimate_memory.py --config examples/configs/qwen3_1p7b.yaml --world-size 32 \
        device.type=cuda precision.params_dtype=bf16 rlp.contexts_per_step=512 \
        rlp.group_size=16 rlp.max_thought_tokens=2048 train.micro_batch_size=1

Overrides are the training command's own `section.key=value` (the launch scripts pass the
same ones). Prints a table (or `--json`) of what one GPU holds:

  persistent   parameters (params dtype), gradients (fp32 main-grad buffer, Megatron DDP
               with grad_reduce_in_fp32), Adam (fp32 master copy when params are bf16, plus
               m and v; divided by DP with the distributed optimizer), the fp32 EMA teacher
               (sharded like the policy: TP, not DP)
  rollout      KV cache (attention layers) and conv/SSM state (Mamba layers) for one
               rollout chunk of C = rlp.rollout_chunk_contexts contexts (0 = all B/DP of
               the rank's) and R = C x G rows: with rlp.share_prefixes (cascade decode,
               packing/cascade.py) C x P + R x T tokens, else R x (P + T), where P is a
               document window (`RLPConfig.max_window_tokens`) + `<think>` and T is
               L_think + 1, as the engine allocates them; one layer of prefill
               activations (with rlp.share_prefixes one row per document window the chunk
               uses, packing/prefill.py, else one per context); the full-vocabulary fp32
               logits of a decode step and the sampler's copies
  scoring      the teacher's fp32 forward over the documents' windows (B/DP/positions per
               document rows): one layer of activations and the vocab-parallel logits at
               the scored positions only (positions_per_document per window)
  update       activations kept for backward of one micro-batch (train.micro_batch_size
               sequences of prefix + thought; 0 = all local sequences at once; less with
               train.recompute_granularity), times the micro-batches 1F1B keeps in flight
               on the first pipeline stage (min(PP, micro-batches)), the logits and their
               gradient
  overhead     CUDA context, NCCL buffers, allocator slack (--overhead-gib)

MoE (`E` layers): routed experts split over EP (and TP), their Adam state over DP / EP with
the distributed optimizer; an MoE layer keeps the top-k routed copies of each token through
its experts (`moe_bytes`) and, in a no-grad forward, holds its dispatcher's buffers at once
(`moe_transient_bytes`). Routing is taken as even (what the load-balancing loss aims at):
each rank's experts receive the top-k copies of as many tokens as the rank sends.

Peak = persistent + the largest phase + overhead. Activation sizes follow Korthikanti et
al. (2022) per layer kind, without recomputation or sequence parallelism. Attention: the
prefill and scoring take `attention` (`attention_kind`: `flash` with Transformer Engine
layers, else the local spec's materialised softmax, `unfused`); the RLP update takes
`update_attention`: with the packed update's FlexAttention (`model.packed_attention` flex,
the CUDA default for attention-only models) it keeps no scores, whatever the spec.
Numbers are estimates to pick a layout, not measurements: leave ~10% slack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_rlp.config import RunConfig
from megatron_rlp.models.vocab import padded_vocab_size
from megatron_rlp.packing.update import packable

GIB = 1024**3
MAMBA_CONV_KERNEL = 4  # Megatron MambaMixer d_conv default
MAMBA_CHUNK = 128  # Megatron MambaMixer chunk_size default (the SSD scan's chunk)


@dataclass
class Shapes:
    """Model shapes derived from a config (Megatron's defaults where the config is silent)."""

    hidden: int
    ffn: int
    gated: bool
    heads: int
    groups: int
    head_dim: int
    qk_norm: bool
    vocab: int
    tied: bool
    n_attn: int
    n_mlp: int
    n_mamba: int
    m_heads: int
    m_head_dim: int
    m_state: int
    m_groups: int
    # MoE (`E`) layers: routed experts of `moe_ffn` each, top-k per token, an optional shared
    # expert of `shared_ffn`; experts split over EP (and over TP as Megatron's expert TP).
    n_moe: int = 0
    experts: int = 0
    topk: int = 0
    moe_ffn: int = 0
    shared_ffn: int = 0

    @property
    def d_inner(self) -> int:
        return self.m_heads * self.m_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.m_groups * self.m_state


def shapes(cfg: RunConfig, vocab_size: int) -> Shapes:
    m = cfg.model
    pattern = m.hybrid_layer_pattern
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    m_head_dim = m.mamba_head_dim
    m_heads = m.mamba_num_heads or (2 * m.hidden_size) // m_head_dim  # Megatron: expand=2
    return Shapes(
        hidden=m.hidden_size, ffn=m.ffn_hidden_size, gated=m.activation == "swiglu",
        heads=m.num_attention_heads, groups=m.num_query_groups, head_dim=head_dim,
        qk_norm=m.qk_layernorm,
        vocab=padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by),
        tied=not m.untie_embeddings_and_output_weights,
        n_attn=pattern.count("*"), n_mlp=pattern.count("-"), n_mamba=pattern.count("M"),
        m_heads=m_heads, m_head_dim=m_head_dim, m_state=m.mamba_state_dim,
        m_groups=m.mamba_num_groups,
        n_moe=pattern.count("E"), experts=m.num_experts or 0, topk=m.moe_router_topk,
        moe_ffn=m.moe_ffn_hidden_size or m.ffn_hidden_size,
        shared_ffn=m.moe_shared_expert_intermediate_size or 0,
    )


def parameter_counts(s: Shapes, tp: int, ep: int = 1) -> dict[str, float]:
    """Total parameters and this rank's share under tensor parallelism (norms replicated)
    and expert parallelism (`experts_per_rank`: the routed experts' share, in `per_rank`;
    `active`: what one token runs through, top-k experts of each MoE layer)."""
    h, d = s.hidden, s.head_dim
    attn_split = h * (s.heads * d + 2 * s.groups * d) + s.heads * d * h
    attn_repl = h + (2 * d if s.qk_norm else 0)
    mlp_split = h * s.ffn * (2 if s.gated else 1) + s.ffn * h
    mlp_repl = h
    di, cd, nh = s.d_inner, s.conv_dim, s.m_heads
    mamba_split = (h * (2 * di + 2 * s.m_groups * s.m_state + nh)  # in_proj
                   + cd * MAMBA_CONV_KERNEL + cd  # conv1d weight + bias
                   + 3 * nh  # dt_bias, A_log, D
                   + di  # gated RMSNorm
                   + di * h)  # out_proj
    mamba_repl = h
    emb = s.vocab * h * (1 if s.tied else 2)
    expert = h * s.moe_ffn * (2 if s.gated else 1) + s.moe_ffn * h
    shared = h * s.shared_ffn * (2 if s.gated else 1) + s.shared_ffn * h
    routed = s.n_moe * s.experts * expert
    split = (s.n_attn * attn_split + s.n_mlp * mlp_split + s.n_mamba * mamba_split + emb
             + s.n_moe * shared)
    repl = (s.n_attn * attn_repl + s.n_mlp * mlp_repl + s.n_mamba * mamba_repl + h  # final norm
            + s.n_moe * (h + s.experts * h))  # pre-MLP norm, router
    experts_here = routed / (tp * ep)
    total = split + repl + routed
    return {"total": total, "per_rank": split / tp + repl + experts_here,
            "experts_per_rank": experts_here, "embedding": emb,
            "non_embedding": total - emb,
            "active": total - routed + s.n_moe * s.topk * expert}


def mamba_bytes_per_token(s: Shapes, tp: int, b: int, window_share: float | None = None
                          ) -> float:
    """Bytes one Mamba layer keeps for backward per update token, on the GPU path (mamba-ssm's
    kernels, which keep their inputs and recompute the rest; b = dtype bytes).

    `window_share` None: Megatron's `_ssm_training` (one fused split-conv-scan kernel): norm
    and `in_proj` inputs, `in_proj`'s output, the conv's input and output, y, the gated norm's
    inputs, `out_proj`'s input. A share w (the packed update, `models/mamba/branches.py`, of
    which w of the tokens are windows): the norm and projections as before; the torch causal
    conv in fp32 (its padded input and its output) on every token; the SSD kernel's copies of
    x, dt, B, C, its output and dA_cumsum [heads, chunks x 128] fp32; on the window tokens
    `ops.ssd_states_at` in fp32 (x, x * dt and its chunk-permuted copy, B per head, and
    each 128-token chunk's entering state [heads, headdim, state]); the gated norm's rows and
    rstd. Measured with `tools/simulated_census.py` (docs/simulated_cuda.md)."""
    h, di, cd, nh = s.hidden, s.d_inner, s.conv_dim, s.m_heads
    gn = s.m_groups * s.m_state
    in_proj = (2 * di + 2 * gn + nh) / tp
    if window_share is None:  # in_proj out, conv in/out, y, norm in (y, z), out
        return b * (2 * h + in_proj + 2 * cd / tp + 4 * di / tp)
    scan = (b * (2 * di + nh + 2 * gn) + 4 * nh) / tp
    states = (12 * di + 4 * nh * s.m_state + 4 * di * s.m_state / MAMBA_CHUNK) / tp
    return (b * (2 * h + in_proj) + 8 * cd / tp + scan + window_share * states
            + (2 * b * di + 4 * s.m_groups) / tp)


def activation_bytes_per_token(s: Shapes, tp: int, b: int, seq: int, attention: str,
                               mamba_window_share: float | None = None) -> float:
    """Bytes kept for backward per token, all layers (b = dtype bytes; `mamba_window_share`:
    `mamba_bytes_per_token`'s, for the packed update)."""
    h, d = s.hidden, s.head_dim
    q, kv = s.heads * d, s.groups * d
    attn = b * (2 * h + (q + 2 * kv) / tp + q / tp)  # norm in, QKV in/out, proj in
    if s.qk_norm:
        attn += b * (q + kv) / tp
    if attention == "unfused":  # scores and softmax probabilities, [heads/tp, seq] per token
        attn += 2 * b * (s.heads / tp) * seq
    f1 = s.ffn * (2 if s.gated else 1)
    mlp = b * (2 * h + f1 / tp + s.ffn / tp)  # norm in, fc1 in/out, fc2 in
    mamba = mamba_bytes_per_token(s, tp, b, mamba_window_share)
    return (s.n_attn * attn + s.n_mlp * mlp + s.n_mamba * mamba + s.n_moe * moe_bytes(s, tp, b)
            + 2 * b * h)


def moe_bytes(s: Shapes, tp: int, b: int) -> float:
    """Bytes per token an MoE layer keeps for backward, as Megatron's MoE layer with local
    (`SequentialMLP`) experts keeps them (`tools/simulate_gpu.py` with an even top-k routing,
    docs/moe.md): norm in and out (the router's and the dispatcher's input), and per routed
    copy the expert's fc1 input (the sorted tokens), fc1 output, the activation's output
    times the routing probability (Megatron's `per_token_scale`: the activation output and
    the product, fc2's input) and with a gated unit the unfused GLU's silu output and its
    linear half plus `glu_linear_offset`; the router's fp32 scores and the permutation's
    int64 index ([tokens, experts] each); a shared expert as an MLP, likewise. The buffers
    that carry the tokens to and from the experts (before and after the all-to-all, the
    combine) are freed in the forward: `moe_transient_bytes`. Measured by
    tools/simulate_moe_layer.py (Qwen3-30B-A3B: 117,056 bytes a token simulated, 116,736 here)."""
    if not s.n_moe:
        return 0.0
    f = s.moe_ffn / tp
    f1 = f * (2 if s.gated else 1)
    routed = s.topk * (s.hidden + f1 + 2 * f + (2 * f if s.gated else 0))
    fs = s.shared_ffn / tp
    shared = fs * (2 if s.gated else 1) + fs + (2 * fs if s.gated else 0)
    # fp32 scores (a second [tokens, experts] with a sigmoid router) and the int64 index
    return b * (2 * s.hidden + routed + shared) + (4 + 4 + 8) * s.experts


def moe_transient_bytes(s: Shapes, tp: int, b: int) -> float:
    """Bytes per token of an MoE layer's no-grad forward at its peak (the rollout's and the
    teacher's): norm in and out, per routed copy the dispatcher's buffers (the permuted
    token before and after the all-to-all, the sorted one), fc1's output and fc2's input;
    the router's fp32 scores; a shared expert as an MLP."""
    if not s.n_moe:
        return 0.0
    f1 = s.moe_ffn * (2 if s.gated else 1)
    routed = s.topk * (3 * s.hidden + f1 / tp + s.moe_ffn / tp)
    shared = (s.shared_ffn * (2 if s.gated else 1) + s.shared_ffn) / tp
    return b * (2 * s.hidden + routed + shared) + 4 * 2 * s.experts


def kept_activation_bytes_per_token(s: Shapes, tp: int, b: int, seq: int, attention: str,
                                    recompute: str, recompute_layers: int,
                                    mamba_window_share: float | None = None) -> float:
    """`activation_bytes_per_token` under Megatron's activation recomputation: `selective`
    drops the attention scores (recomputed in backward), `full` keeps each group of
    `recompute_layers` layers' input plus, during backward, one group's activations."""
    if recompute == "selective":
        return activation_bytes_per_token(s, tp, b, seq, "flash", mamba_window_share)
    every = activation_bytes_per_token(s, tp, b, seq, attention, mamba_window_share)
    if recompute != "full":
        return every
    layers = s.n_attn + s.n_mlp + s.n_mamba + s.n_moe
    groups = math.ceil(layers / recompute_layers)
    return groups * b * s.hidden + every * min(recompute_layers, layers) / layers


def one_layer_inference_bytes(s: Shapes, tp: int, b: int, rows: int, seq: int,
                              attention: str) -> float:
    """Largest transient of a no-grad forward: the residual stream plus one layer's inside."""
    h = s.hidden
    attn = (s.heads + 2 * s.groups) * s.head_dim / tp + s.heads * s.head_dim / tp
    if attention == "unfused":
        attn += 2 * (s.heads / tp) * seq  # scores + probabilities
    mlp = (s.ffn * (2 if s.gated else 1) + s.ffn) / tp if s.n_mlp else 0
    mamba = (2 * s.d_inner + 2 * s.m_groups * s.m_state + 2 * s.conv_dim) / tp if s.n_mamba else 0
    moe = moe_transient_bytes(s, tp, b) / b  # the dispatcher's buffers, the routed copies
    return b * rows * seq * (3 * h + max(attn if s.n_attn else 0, mlp, mamba, moe))


def attention_kind(cfg: RunConfig, te_available: bool) -> str:
    """The core attention of the rollout's prefill and the scoring forward: `flash` where the
    layers are Transformer Engine's (fused attention; `transformer_impl` resolved as the
    builder does it, `backends.transformer_engine.resolve_transformer_impl`), else `unfused`
    (the local spec's materialised softmax). What start-up checks a launch with
    (`startup.check_memory`) and `tools/estimate_memory.py` prints by default."""
    from megatron_rlp.backends.transformer_engine import resolve_transformer_impl

    try:
        impl = resolve_transformer_impl(cfg.model.transformer_impl, cfg.device.type,
                                        te_available)
    except ValueError:
        return "unfused"
    return "flash" if impl == "transformer_engine" else "unfused"


def update_attention(cfg: RunConfig, attention: str) -> str:
    """The attention kind of the RLP update's backward: the packed update's FlexAttention
    (`packing.flex`, `model.packed_attention` resolved as the update resolves it) is a fused
    kernel that keeps no scores whatever the layer spec (`flash`); otherwise `attention`."""
    from megatron_rlp.packing.flex import resolve

    if cfg.train.objective != "rlp":
        return attention
    try:
        kind = resolve(cfg.model.packed_attention, cfg.device.type,
                       cfg.model.hybrid_layer_pattern)
    except ValueError:
        return attention
    return "flash" if kind == "flex" else attention


def estimate(cfg: RunConfig, world_size: int, vocab_size: int, attention: str = "unfused",
             overhead_gib: float | None = None) -> dict:
    """Bytes per rank, by item and phase (see the module docstring). `attention` is the
    prefill's and the scoring's kind (`attention_kind`); the update's is `update_attention`."""
    p, r, t = cfg.parallel, cfg.rlp, cfg.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = world_size // (tp * pp)
    s = shapes(cfg, vocab_size)
    ep = p.expert_model_parallel_size
    counts = parameter_counts(s, tp, ep)
    n = counts["per_rank"] / pp  # layers split evenly over stages (rough for PP > 1)
    n_experts = counts["experts_per_rank"] / pp
    bf16 = cfg.precision.params_dtype == "bf16"
    pb = 2 if bf16 else 4
    opt_per_param = (4 if bf16 else 0) + 8  # fp32 master (bf16 only) + Adam m, v
    # The distributed optimizer shards dense state over DP, expert state over the
    # expert-data-parallel group (DP / EP).
    optimizer = ((n - n_experts) * opt_per_param / (dp if p.use_distributed_optimizer else 1)
                 + n_experts * opt_per_param / (dp // ep if p.use_distributed_optimizer else 1))
    persistent = {
        "parameters": n * pb,
        "gradients": n * 4,
        "optimizer": optimizer,
        # rlp.teacher_scoring=off builds no fp32 shadow (scoring/ema_teacher.py)
        "ema_teacher": n * 4 if t.objective == "rlp" and r.teacher_scoring != "off" else 0.0,
    }

    contexts = r.contexts_per_step // dp
    rows = contexts * r.group_size
    chunk_contexts = min(r.rollout_chunk_contexts or contexts, contexts)
    chunk_rows = chunk_contexts * r.group_size
    rollout_chunks = math.ceil(contexts / chunk_contexts)
    # The longest prefix is a document's whole window: longer than max_prefix_tokens with
    # several positions per document (data/contexts.py, `RLPConfig.max_window_tokens`).
    window = r.max_window_tokens()
    seq = window + r.max_thought_tokens + 2
    layers_here = 1 / pp
    # With rlp.share_prefixes the rollout decodes with cascade attention (packing/cascade.py):
    # each context's prefix (window + `<think>`) once, each row its own thought columns
    # (L_think + `</think>`): C x P + R x T entries; without it every row holds P + T.
    entries = (chunk_contexts * (window + 1) + chunk_rows * (r.max_thought_tokens + 1)
               if r.share_prefixes else chunk_rows * seq)
    kv = (s.n_attn * layers_here * 2 * entries * (s.groups * s.head_dim / tp) * pb)
    # The Mamba decode state is fp32 whatever the params dtype (models/mamba/mixer.py).
    conv_state = chunk_rows * (s.conv_dim / tp) * (MAMBA_CONV_KERNEL - 1) * 4
    ssm_state = chunk_rows * (s.m_heads / tp) * s.m_head_dim * s.m_state * 4
    mamba_state = s.n_mamba * layers_here * (conv_state + ssm_state)
    # With rlp.share_prefixes the rollout prefills each document window once (packing/prefill.py:
    # SharedWindows.chunk keeps only the windows a chunk's contexts use), positions_per_document
    # contexts a window in order: a chunk starting g = gcd(chunk, per_doc) past a window's start
    # (the worst offset) touches ceil((per_doc - g + chunk) / per_doc) windows.
    per_doc = r.positions_per_document
    prefill_rows = (min(chunk_contexts, math.ceil(
        (per_doc - math.gcd(chunk_contexts, per_doc) + chunk_contexts) / per_doc))
        if r.share_prefixes else chunk_contexts)
    prefill = one_layer_inference_bytes(s, tp, pb, prefill_rows, window + 1, attention)
    decode_logits = chunk_rows * s.vocab * (pb + 3 * 4)  # gathered logits, fp32 + sampler copies
    rollout = {"kv_cache": kv, "ssm_conv_state": mamba_state,
               "transient": max(prefill, decode_logits)}

    documents = max(1, contexts // r.positions_per_document)
    scoring = {
        "activations": one_layer_inference_bytes(s, tp, 4, documents, window, attention),
        # scoring/next_token.py projects only the scored positions onto the vocabulary
        "logits": documents * r.positions_per_document * (s.vocab / tp) * 4,
    } if t.objective == "rlp" else {"activations": 0.0, "logits": 0.0}

    if t.objective == "rlp":
        sequences, upd_seq, scored = rows, window + 1 + r.max_thought_tokens, \
            r.max_thought_tokens
    else:
        sequences, upd_seq = cfg.data.ntp_batch_size // dp, cfg.data.ntp_seq_length
        scored = upd_seq
    mbs = t.micro_batch_size or sequences
    tokens = mbs * upd_seq
    # The packed update scans each window once and its branches from the window's states
    # (models/mamba/branches.py); Megatron's fused path otherwise.
    packed = t.objective == "rlp" and r.share_prefixes and packable(
        cfg.model.hybrid_layer_pattern, r.positions_per_document * r.group_size, sequences,
        t.micro_batch_size)
    upd_attention = update_attention(cfg, attention)
    # Megatron's 1F1B schedule (`schedules.forward_backward_pipelining_without_interleaving`)
    # runs PP - 1 - rank warm-up forwards before a stage's first backward, so the first stage
    # (the worst) keeps min(PP, micro-batches) micro-batches' activations at once.
    in_flight = min(pp, math.ceil(sequences / mbs))
    update = {
        "activations": in_flight * tokens * kept_activation_bytes_per_token(
            s, tp, pb, upd_seq, upd_attention, t.recompute_granularity, t.recompute_num_layers,
            mamba_window_share=(window + 1) / upd_seq if packed else None) * layers_here,
        # logits and their gradient in the params dtype, fp32 log-softmax, on the scored
        # positions (RLP projects only the thought-predicting positions onto the vocabulary)
        "logits": mbs * scored * (s.vocab / tp) * (2 * pb + 3 * 4),
    }
    if overhead_gib is None:
        overhead_gib = 4.0 if cfg.device.type == "cuda" else 0.5
    phases = {"rollout": rollout, "scoring": scoring, "update": update}
    phase_totals = {k: sum(v.values()) for k, v in phases.items()}
    peak_phase = max(phase_totals, key=phase_totals.get)
    total = sum(persistent.values()) + phase_totals[peak_phase] + overhead_gib * GIB
    return {
        "layout": {"world_size": world_size, "tp": tp, "pp": pp, "dp": dp, "ep": ep,
                   "distributed_optimizer": p.use_distributed_optimizer,
                   "params_dtype": cfg.precision.params_dtype, "attention": attention,
                   "update_attention": upd_attention,
                   "rollout_chunks": rollout_chunks},
        "batch": {"contexts_per_step": r.contexts_per_step, "contexts_per_rank": contexts,
                  "group_size": r.group_size, "rollout_rows_per_rank": rows,
                  "rollout_seq_len": seq, "documents_per_rank": documents,
                  "update_micro_batch": mbs, "update_micro_batches": math.ceil(sequences / mbs),
                  "update_micro_batches_in_flight": in_flight,
                  "update_seq_len": upd_seq},
        "parameters": {"total": counts["total"], "per_rank": n,
                       "non_embedding": counts["non_embedding"], "active": counts["active"]},
        "persistent": persistent,
        "phases": phases,
        "phase_totals": phase_totals,
        "peak_phase": peak_phase,
        "overhead": overhead_gib * GIB,
        "total": total,
    }


def _gib(x: float) -> str:
    return f"{x / GIB:9.2f}"


def table(est: dict, gpu_gib: float) -> str:
    lay, bat = est["layout"], est["batch"]
    lines = [
        f"layout: {lay['world_size']} ranks = TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}"
        + (f" (EP {lay['ep']})" if lay["ep"] > 1 else "")
        + f" | {lay['params_dtype']} params | distributed optimizer "
        f"{'on' if lay['distributed_optimizer'] else 'off'} | attention {lay['attention']}"
        + (f" (update {lay['update_attention']})"
           if lay.get("update_attention", lay["attention"]) != lay["attention"] else "")
        + (f" | rollout chunks {lay['rollout_chunks']}" if lay["rollout_chunks"] > 1 else ""),
        f"batch:  {bat['contexts_per_step']} contexts/step -> {bat['contexts_per_rank']}/rank x "
        f"G {bat['group_size']} = {bat['rollout_rows_per_rank']} rollout rows of "
        f"{bat['rollout_seq_len']} tokens; update {bat['update_micro_batches']} x "
        f"{bat['update_micro_batch']} sequences of {bat['update_seq_len']}",
        f"params: {est['parameters']['total'] / 1e9:.3f} B total, "
        f"{est['parameters']['per_rank'] / 1e9:.3f} B on this rank"
        + (f", {est['parameters']['active'] / 1e9:.3f} B active per token"
           if est["parameters"]["active"] < est["parameters"]["total"] else ""),
        "",
        f"{'item':<34}{'GiB/rank':>9}",
    ]
    labels = {"parameters": "parameters", "gradients": "gradients (fp32 main_grad)",
              "optimizer": "Adam (fp32 master, m, v)", "ema_teacher": "EMA teacher (fp32)"}
    for k, v in est["persistent"].items():
        lines.append(f"  {labels[k]:<32}{_gib(v)}")
    lines.append(f"{'persistent':<34}{_gib(sum(est['persistent'].values()))}")
    for phase, items in est["phases"].items():
        mark = "  <- peak" if phase == est["peak_phase"] else ""
        lines.append(f"{phase + ' phase':<34}{_gib(est['phase_totals'][phase])}{mark}")
        for k, v in items.items():
            lines.append(f"  {k.replace('_', ' '):<32}{_gib(v)}")
    lines.append(f"{'overhead (CUDA, NCCL, allocator)':<34}{_gib(est['overhead'])}")
    lines.append(f"{'peak':<34}{_gib(est['total'])}  of {gpu_gib:.0f} GiB: "
                 + ("fits" if est["total"] <= gpu_gib * GIB else "DOES NOT FIT"))
    return "\n".join(lines)
