"""A tiny hybrid HybridModel (`M-M*-M-`: Mamba-2, MLP, attention) on CPU: Megatron's own
MambaMixer runs on the pure-torch kernels, cached decoding with conv/SSM states equals full
forwards (batch > 1, left padding, after forking), and padded scoring equals unpadded rows.

One-process gloo group, fp32. References are plain `model(ids[None], arange(n)[None], None)`
forwards of each unpadded row (Megatron's training path: fused split-conv-scan kernel);
cached prefill uses the mixer's inference path (conv + chunk scan, states saved) and decode
its recurrent step — three different code paths that must agree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.utils import InferenceMode
from megatron.core.ssm import mamba_mixer
from megatron.core.ssm.mamba_mixer import MambaMixer

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.models.mamba import adapter, ops
from megatron_rlp.models.mamba import mixer as mixer_module
from megatron_rlp.models.mamba.inference_state import MambaState, fork_cached_states
from megatron_rlp.models.masks import padded_causal_mask
from megatron_rlp.models.provider import build_model
from megatron_rlp.rollout.engine import KVCacheEngine

VOCAB = 261  # byte tokenizer; padded to 320
ATOL = 1e-4
TINY = (
    "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.mamba_num_heads=8", "model.mamba_head_dim=16",
    "model.mamba_state_dim=16", "model.mamba_num_groups=2",
)


@pytest.fixture(scope="module")
def model():
    cfg = load_config("examples/configs/tiny_hybrid_cpu.yaml", TINY)
    assert cfg.model.hybrid_layer_pattern == "M-M*-M-"
    distributed.initialize(cfg)
    net = build_model(cfg, VOCAB).eval()
    yield net
    distributed.shutdown()


def full_logits(model, ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    with torch.no_grad():
        return model(ids[None], torch.arange(len(ids))[None], None)[0].float()


def left_padded(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    p = max(lengths)
    tokens = torch.zeros(len(rows), p, dtype=torch.long)
    valid = torch.zeros(len(rows), p, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, p - len(r):] = torch.tensor(r)
        valid[i, p - len(r):] = True
    return rows, tokens, valid


def cached_forward(model, ctx, tokens, mask) -> torch.Tensor:
    """One static-context forward (prefill or decode step); last-position logits."""
    start = ctx.sequence_len_offset
    positions = torch.arange(start, start + tokens.shape[1]).expand_as(tokens)
    with torch.no_grad(), InferenceMode.active():
        out = model(tokens, positions, mask, inference_context=ctx, runtime_gather_output=True)
    ctx.increment_sequence_len_offset(tokens.shape[1])
    return out[:, -1].float()


def test_megatron_mixer_on_torch_kernels(model):
    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    assert len(mixers) == 3 and all(isinstance(m, mixer_module.LocalMambaMixer) for m in mixers)
    assert adapter.kernel_choice() == adapter.TORCH  # CPU: the torch path (see tests/kernels)
    assert mamba_mixer.selective_state_update is ops.selective_state_update
    assert isinstance(mixers[0].norm, ops.RMSNormGated)
    assert not mixers[0].norm.norm_before_gate and mixers[0].norm.group_size == 64
    assert not hasattr(mixers[0].in_proj, "master_weight")  # dropped after the TP-aware init


def test_decode_equals_full_forward_after_fork(model):
    """Left-padded prefill (several scan chunks), fork 2 ways, 4 decode steps, batch 8."""
    rows, tokens, valid = left_padded([5, 40, 1, 37])
    b, g, steps = len(rows), 2, 4
    ctx = StaticInferenceContext(b * g, tokens.shape[1] + steps)
    logits = cached_forward(model, ctx, tokens, padded_causal_mask(valid))
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i], full_logits(model, r)[-1], atol=ATOL, rtol=0)
    mamba = [v for v in ctx.key_value_memory_dict.values() if isinstance(v, MambaState)]
    assert len(mamba) == 3 and mamba[0].conv.shape[1] == mamba[0].ssm.shape[1] == b

    index = torch.arange(b).repeat_interleave(g)
    fork_cached_states(ctx, index)
    key_valid = torch.zeros(b * g, ctx.max_sequence_length, dtype=torch.bool)
    key_valid[:, :tokens.shape[1]] = valid[index]
    seqs = [list(rows[i // g]) for i in range(b * g)]
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        new = torch.randint(0, VOCAB, (b * g,), generator=gen)
        new[1::g] = new[0::g]  # siblings see the same token for some rows ...
        new[g * 2 + 1] = (new[g * 2] + 1) % VOCAB  # ... and different ones for others
        pos = ctx.sequence_len_offset
        key_valid[:, pos] = True
        logits = cached_forward(model, ctx, new[:, None], ~key_valid[:, None, None, :pos + 1])
        for i in range(b * g):
            seqs[i].append(int(new[i]))
            torch.testing.assert_close(logits[i], full_logits(model, seqs[i])[-1],
                                       atol=ATOL, rtol=0)


def test_engine_rollout_path(model):
    """The rollout engine's prefill / fork / step / keep on the hybrid: its dim-1 fork and
    row selection are right for Mamba states too (they are stored batch on dim 1)."""
    rows, tokens, valid = left_padded([6, 3, 9], seed=1)
    b, g = len(rows), 3
    engine = KVCacheEngine(model, max_batch_size=b * g, max_sequence_length=tokens.shape[1] + 4)
    logits = engine.prefill(tokens, valid)
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i], full_logits(model, r)[-1], atol=ATOL, rtol=0)
    engine.fork(g)
    seqs = [list(rows[i // g]) for i in range(b * g)]
    for step in range(4):
        if step == 2:  # rows leave the batch (finished thoughts): their states go with them
            keep = torch.tensor([7, 1, 4, 8])
            engine.keep(keep)
            seqs = [seqs[i] for i in keep.tolist()]
        new = (torch.arange(len(seqs)) * 7 + step) % 256
        logits = engine.step(new)
        for i in range(len(seqs)):
            seqs[i].append(int(new[i]))
            torch.testing.assert_close(logits[i], full_logits(model, seqs[i])[-1],
                                       atol=ATOL, rtol=0)
    # a second prefill with another batch size re-sizes the Mamba states
    rows, tokens, valid = left_padded([4, 2], seed=2)
    logits = engine.prefill(tokens, valid)
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i], full_logits(model, r)[-1], atol=ATOL, rtol=0)


def test_padded_scoring_forward_equals_rows(model):
    """Teacher-style scoring: one plain forward over left-padded windows (training kernels);
    every real position matches the unpadded row. Without the padding mask it would not."""
    rows, tokens, valid = left_padded([12, 3, 7], seed=4)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)

    def padded_logits():
        with torch.no_grad():
            return model(tokens, positions, padded_causal_mask(valid)).float()

    out = padded_logits()
    for i, r in enumerate(rows):
        torch.testing.assert_close(out[i, valid[i]], full_logits(model, r), atol=ATOL, rtol=0)

    mp = pytest.MonkeyPatch()
    mp.setattr(mixer_module, "padding_from_mask", lambda mask: None)
    try:
        leaky = padded_logits()
    finally:
        mp.undo()
    assert (leaky[1, valid[1]] - out[1, valid[1]]).abs().max() > 1e-3


HF_NEMOTRON_H = textwrap.dedent("""
    import sys, torch
    from transformers import NemotronHConfig, NemotronHForCausalLM
    torch.manual_seed(0)
    cfg = NemotronHConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, hybrid_override_pattern="M-M-", num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, mamba_num_heads=8,
        mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
        layer_norm_epsilon=1e-5)
    model = NemotronHForCausalLM(cfg).eval()
    with torch.no_grad():  # move every ones/zeros-initialised tensor off its default
        for name, p in model.named_parameters():
            if any(k in name for k in ("norm", ".D", "dt_bias", "conv1d.bias")):
                p.add_(0.2 * torch.randn_like(p))
    ids = torch.randint(0, 320, (2, 45))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits  # (its cache needs an attention layer)
    torch.save({"state": model.state_dict(), "ids": ids, "logits": logits}, sys.argv[1])
""")


def test_matches_transformers_nemotron_h(model, tmp_path):
    """Megatron's mixer on the torch kernels vs transformers' NemotronH (its own Mamba-2
    code), same weights, pattern `M-M-`. The HF model is built in a subprocess: the CPU
    backend's torch patches in this process would change what it builds."""
    pytest.importorskip("transformers.models.nemotron_h")
    out = tmp_path / "hf.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-c", HF_NEMOTRON_H, str(out)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = torch.load(out)
    cfg = load_config("examples/configs/tiny_hybrid_cpu.yaml", (
        *TINY, "model.hybrid_layer_pattern=M-M-", "model.untie_embeddings_and_output_weights=true",
        "model.norm_epsilon=1e-5", "model.make_vocab_size_divisible_by=64"))
    ours = build_model(cfg, 320).eval()
    hf = {k.removeprefix("model.").removeprefix("backbone."): v for k, v in ref["state"].items()}
    names = {"embedding.word_embeddings.weight": "embeddings.weight",
             "decoder.final_norm.weight": "norm_f.weight", "output_layer.weight": "lm_head.weight"}
    for i, kind in enumerate("M-M-"):
        mamba = [("in_proj.weight", "in_proj.weight"), ("conv1d_weight", "conv1d.weight"),
                 ("conv1d_bias", "conv1d.bias"), ("dt_bias", "dt_bias"), ("A_log", "A_log"),
                 ("D", "D"), ("norm.weight", "norm.weight"), ("out_proj.weight", "out_proj.weight")]
        pairs = {"M": [("norm.weight", "norm.weight")]
                 + [(f"mixer.{a}", f"mixer.{b}") for a, b in mamba],
                 "-": [("pre_mlp_layernorm.weight", "norm.weight"),
                       ("mlp.linear_fc1.weight", "mixer.up_proj.weight"),
                       ("mlp.linear_fc2.weight", "mixer.down_proj.weight")]}[kind]
        names.update({f"decoder.layers.{i}.{a}": f"layers.{i}.{b}" for a, b in pairs})
    state = ours.state_dict()
    assert {k for k in state if not k.endswith("_extra_state")} == set(names)
    assert set(names.values()) == set(hf)
    ours.load_state_dict({**state, **{k: hf[v] for k, v in names.items()}})
    with torch.no_grad():
        ids = ref["ids"]
        logits = ours(ids, torch.arange(ids.shape[1]).expand_as(ids), None).float()
    torch.testing.assert_close(logits, ref["logits"], atol=ATOL, rtol=0)


def test_decoding_from_an_unforked_cache_fails_loudly(model):
    rows, tokens, valid = left_padded([3, 4], seed=5)
    ctx = StaticInferenceContext(4, 8)
    cached_forward(model, ctx, tokens, padded_causal_mask(valid))
    with pytest.raises(RuntimeError, match="fork_cached_states"):
        cached_forward(model, ctx, torch.zeros(4, 1, dtype=torch.long), None)


def test_training_step_reaches_every_parameter(model):
    model.train()
    try:
        rows, tokens, valid = left_padded([10, 6], seed=6)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        model(tokens, positions, padded_causal_mask(valid)).float().logsumexp(-1)[valid].sum(
        ).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing
        grads = {n: p.grad for n, p in model.named_parameters() if ".mixer." in n}
        assert all(bool(torch.isfinite(v).all()) and v.abs().sum() > 0 for v in grads.values())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
