"""FLOP model of one RLP or NTP step: the step lines' TFLOP/s (train/loop.py) and
tools/bench_rlp.py's achieved FLOP/s and MFU.

Model FLOPs of the work the step needs, counted once whatever a path executes (as MFU is
defined): each document window's prefix is computed once per phase, attention counts only
the (query, key) pairs a query reads. Per token, forward:

    linear   2 x (weights of the layers it passes: attention QKV/O, MLP, Mamba in/out proj)
    attention 4 x heads x head_dim per (query, key) pair and attention layer (QK^T and PV)
    logits   2 x hidden x padded vocabulary, only where a distribution is needed

Backward is twice the forward. Phases:
    prefill  every window once (causal) + `<think>` per context; logits per context
    decode   every fed thought token (sampled ones and a forced `</think>`), attending to its
             prefix and the thought so far; logits each
    scoring  the teacher over every window; logits per context
    update   3 x forward over windows + every branch `<think> thought[:-1]`; logits per
             thought token
Mamba's scan and conv are left out (linear projections only): small next to the projections.
NTP: 3 x forward over its windows (causal), logits at every position.

Own code: Megatron-LM's `num_floating_point_operations` (megatron/training/training.py) counts
fixed-length GPT batches; an RLP step's work depends on the sampled thought lengths.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelDims:
    linear_weights: int  # weights of all layers' matmuls (no embedding / output layer)
    attention_layers: int
    attn_width: int  # heads x head_dim
    hidden: int
    vocab: int  # padded


def model_dims(cfg, vocab_size: int) -> ModelDims:
    from megatron_rlp.models.vocab import padded_vocab_size

    m = cfg.model
    h = m.hidden_size
    hd = m.kv_channels or h // m.num_attention_heads
    attn = h * hd * (2 * m.num_attention_heads + 2 * m.num_query_groups)  # QKV and O
    mlp = (3 if m.activation == "swiglu" else 2) * h * m.ffn_hidden_size
    d_inner = 2 * h
    heads = m.mamba_num_heads or d_inner // m.mamba_head_dim
    mamba = h * (2 * d_inner + 2 * m.mamba_num_groups * m.mamba_state_dim + heads) + d_inner * h
    p = m.hybrid_layer_pattern
    return ModelDims(linear_weights=p.count("*") * attn + p.count("-") * mlp + p.count("M") * mamba,
                     attention_layers=p.count("*"), attn_width=m.num_attention_heads * hd,
                     hidden=h, vocab=padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by))


def _forward(d: ModelDims, tokens: int, pairs: int, logits: int) -> float:
    return (2.0 * d.linear_weights * tokens + 4.0 * d.attention_layers * d.attn_width * pairs
            + 2.0 * d.hidden * d.vocab * logits)


def _arange_sum(start, count):
    """sum(start + j for j in range(count)), elementwise (int64 tensors)."""
    return count * start + count * (count - 1) // 2


def step_flops(d: ModelDims, trace: dict) -> dict[str, float]:
    """FLOPs per phase of the step a `rlp_step` trace describes (prompts, windows, thoughts),
    this rank's rows. Closed forms over [R] tensors: no loop over tokens."""
    prompts, windows, thoughts = trace["prompts"], trace["windows"], trace["thoughts"]
    win = windows.valid.sum(1).long().cpu()  # window lengths (= longest prefix of the document)
    win_tokens, win_pairs = int(win.sum()), int((win * (win + 1) // 2).sum())
    p = prompts.lengths.long().cpu()
    g = len(thoughts.lengths) // len(p)
    n = thoughts.lengths.long().cpu()
    fed = n + (~thoughts.closed.cpu()).long()  # an open thought is also fed its `</think>`
    pk = p.repeat_interleave(g)
    prefill = _forward(d, win_tokens + len(p), win_pairs + int((p + 1).sum()), len(p))
    dec_tokens = int(fed.sum())
    dec_pairs = int(_arange_sum(pk + 2, fed).sum())  # prefix, <think>, thought so far
    upd_tokens, upd_pairs = int(n.sum()), int(_arange_sum(pk + 1, n).sum())
    decode = _forward(d, dec_tokens, dec_pairs, dec_tokens)
    scoring = _forward(d, win_tokens, win_pairs, len(p))
    update = 3.0 * _forward(d, win_tokens + upd_tokens, win_pairs + upd_pairs, upd_tokens)
    out = {"prefill": prefill, "decode": decode, "scoring": scoring, "update": update}
    out["step"] = sum(out.values())
    return out


def ntp_flops(d: ModelDims, rows: int, seq_length: int) -> float:
    """FLOPs of an NTP step over `rows` windows of `seq_length` tokens (forward + backward)."""
    tokens = rows * seq_length
    return 3.0 * _forward(d, tokens, rows * seq_length * (seq_length + 1) // 2, tokens)


# Dense bf16 peak TFLOP/s of the cards the recipes target (vendor datasheets, no sparsity):
# the denominator of the step lines' MFU. Other devices (the CPU backend) print no MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "B200": 2250.0,
                    "GB200": 2500.0}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a CUDA device by its name (`torch.cuda.get_device_name`,
    e.g. "NVIDIA H100 80GB HBM3"), or None for a device not in `PEAK_BF16_TFLOPS`."""
    for card, peak in PEAK_BF16_TFLOPS.items():  # a whole word or a prefix of one ("A100-SXM4")
        if card in device_name.upper().split() or f" {card}" in f" {device_name.upper()}":
            return peak
    return None
