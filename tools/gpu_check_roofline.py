"""The qwen3_shape stage's figures (tools/gpu_check.py): decode against the HBM roofline and
the update's MFU, from the FLOPs the step computed (gpu_check_step.py: computed_update_work).
"""

from __future__ import annotations


def model_shape(cfg, vocab: int) -> dict[str, float]:
    """Parameter counts (matmul weights of the layers, output layer) and per-token K/V size
    of `cfg.model` with the padded vocabulary `vocab`."""
    m = cfg.model
    kv = m.kv_channels or m.hidden_size // m.num_attention_heads
    pattern = m.hybrid_layer_pattern
    attn = m.hidden_size * kv * (2 * m.num_attention_heads + 2 * m.num_query_groups)
    mlp = m.hidden_size * m.ffn_hidden_size * (3 if m.activation == "swiglu" else 2)
    heads = m.mamba_heads()
    d_inner = heads * m.mamba_head_dim
    mamba = m.hidden_size * (2 * d_inner + 2 * m.mamba_num_groups * m.mamba_state_dim + heads) \
        + d_inner * m.hidden_size
    layers = pattern.count("*") * attn + pattern.count("-") * mlp + pattern.count("M") * mamba
    return {"layer_matmul_params": float(layers), "output_params": float(vocab * m.hidden_size),
            "attention_layers": float(pattern.count("*")),
            "attention_width": float(m.num_attention_heads * kv),
            "kv_bytes_per_token_bf16": float(pattern.count("*") * 2 * m.num_query_groups * kv * 2)}


def roofline(shape: dict, work: dict, decode_s: float, update_s: float, hbm_tbps: float,
             peak_tflops: float) -> dict[str, float]:
    """Decode against its roofline and the update's MFU.

    Args:
        shape: `model_shape`.
        work: the step's computed work: `rows`, `mean_prefix_tokens`, `thought_tokens`
            (decoded, all rows), `tokens` and `attention_pairs` the update computed.
        decode_s, update_s: the rollout and update phases' seconds.

    Decode: a full-batch step reads the bf16 weights and each row's K/V (prefix + 1 + half the
    thought on average) and does 2 x params FLOPs per row; its time is max(bytes / HBM,
    FLOPs / peak). Update: forward = 2 x matmul params x tokens + 2 x output params x thought
    positions + 4 x width x (query, key) pairs per attention layer; MFU = 3 x forward /
    seconds / peak (forward + backward)."""
    peak, bw = peak_tflops * 1e12, hbm_tbps * 1e12
    rows, prefix = work["rows"], work["mean_prefix_tokens"]
    thought = work["thought_tokens"] / rows
    weights = 2 * (shape["layer_matmul_params"] + shape["output_params"])  # bf16 bytes
    context = prefix + 1 + thought / 2  # mean tokens a row's decode step attends to
    step_bytes = weights + rows * context * shape["kv_bytes_per_token_bf16"]
    step_flops = 2 * rows * (shape["layer_matmul_params"] + shape["output_params"]
                             + 2 * shape["attention_layers"] * shape["attention_width"] * context)
    step_s = max(step_bytes / bw, step_flops / peak)
    decoded = work["thought_tokens"]
    forward = (2 * shape["layer_matmul_params"] * work["tokens"]
               + 2 * shape["output_params"] * decoded  # logits at thought positions only
               + 4 * shape["attention_layers"] * shape["attention_width"]
               * work["attention_pairs"])
    return {
        "decode_tokens_per_s": decoded / decode_s,
        "decode_roofline_tokens_per_s": rows / step_s,
        "decode_fraction_of_roofline": (decoded / decode_s) / (rows / step_s),
        "decode_bound": "hbm" if step_bytes / bw >= step_flops / peak else "compute",
        "update_tokens_per_s": work["tokens"] / update_s,
        "update_model_tflops": 3 * forward / update_s / 1e12,
        "update_mfu": 3 * forward / update_s / peak,
    }


def qwen3_overrides(args, extra: tuple[str, ...], tokenizer: str) -> list[str]:
    """The Qwen3-shaped step's overrides (bf16 on `args.device`, the BPE test tokenizer)."""
    return [f"device.type={args.device}", "precision.params_dtype=bf16",
            f"data.tokenizer={tokenizer}", f"rlp.contexts_per_step={args.contexts}",
            f"rlp.group_size={args.group}", f"rlp.max_thought_tokens={args.thought_tokens}",
            f"rlp.min_prefix_tokens={args.prefix_tokens // 2}",
            f"rlp.max_prefix_tokens={args.prefix_tokens}", "rlp.positions_per_document=4",
            f"train.micro_batch_size={args.micro_batch}", f"train.seed={args.seed}",
            "train.progress=false", *extra]


def summarize(measured: dict, config: str, overrides: list[str], tokenizer: str,
              hbm_tbps: float, peak_tflops: float) -> dict:
    """The stage's JSON: what ran, the phases, peak memory, the model shape, the figures."""
    from megatron_rlp.models.vocab import padded_vocab_size
    from megatron_rlp.startup import load_config
    from megatron_rlp.tokenizer import build_tokenizer

    cfg = load_config(config, tuple(overrides))
    vocab = padded_vocab_size(build_tokenizer(tokenizer).vocab_size,
                              cfg.model.make_vocab_size_divisible_by)
    shape = model_shape(cfg, vocab)
    phases, work = measured["phases_s"], measured["work"]
    return {"run": measured["run"], "overrides": overrides, "phases_s": phases,
            "step_s": measured["step_s"], "work": work, "model": shape,
            "peak_memory_gib": measured["peak_memory_gib"],
            "memory_kind": measured["memory_kind"],
            "peaks": {"hbm_tbps": hbm_tbps, "peak_tflops": peak_tflops},
            **roofline(shape, work, phases["rollout"], phases["update"], hbm_tbps,
                       peak_tflops)}
