"""`rlp.thought_template` (rollout/template.py): `none` changes nothing; `paper` and `{context}`
strings give the policy `before + x_<t + after + <think>` while the teacher's windows stay raw;
rollouts (per-context == shared prefill) and the update (packed == unpacked, loss and every
gradient) agree with a template whose text after `{context}` is fed as forced tokens.
One-process gloo group, tiny dense HybridModel, fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.tiny_models import tiny_dense_model
from test_packed_update import _inputs, _run

from megatron_rlp.config import ConfigError, load_config
from megatron_rlp.data.batches import update_batch
from megatron_rlp.packing.prefill import SharedWindows
from megatron_rlp.packing.update import packed_update_batches
from megatron_rlp.rollout.template import (
    PAPER_INSTRUCTION,
    apply_template,
    build_template,
    parse_template,
)
from megatron_rlp.rollout.thoughts import sample_thoughts_chunked
from megatron_rlp.tokenizer import ByteTokenizer, build_tokenizer
from megatron_rlp.train.rlp_update import rlp_forward_step

TOK = ByteTokenizer()
G = 3
CUSTOM = "Text: {context}\nThink:"  # text after {context}: forced tokens before <think>
TINY_BPE = Path(__file__).parents[1] / "assets" / "tiny_bpe" / "tokenizer.json"


@pytest.fixture(scope="module")
def model():
    with tiny_dense_model(TOK.vocab_size) as net:
        yield net


def test_none_is_the_identity():
    prompts, windows, _, _ = _inputs()
    t = build_template("none", TOK)
    assert t.before == () and t.lead == (TOK.think_start,) and t.extra_tokens == 0
    got_p, got_w = apply_template(t, prompts, windows, TOK.pad)
    assert got_p is prompts and got_w is windows  # the same tensors, bit for bit


def test_paper_prompts_hold_the_instruction_and_windows_stay_raw():
    prompts, windows, _, _ = _inputs()
    raw_w = windows.tokens.clone()
    t = build_template("paper", TOK)
    assert list(t.before) == TOK.encode(PAPER_INSTRUCTION) and t.lead == (TOK.think_start,)
    assert TOK.think_start in t.before  # "<think>" in the instruction is the marker id
    pol_p, pol_w = apply_template(t, prompts, windows, TOK.pad)
    k = len(t.before)
    for b in range(len(prompts.lengths)):
        raw = prompts.tokens[b, -int(prompts.lengths[b]):].tolist()
        got = pol_p.tokens[b, -int(pol_p.lengths[b]):].tolist()
        assert got == list(t.before) + raw
        assert bool(pol_p.valid[b].sum() == len(got))
        # The same prefix, read from the policy's shared window.
        row, end = int(pol_w.rows[b]), int(pol_w.cols[b]) + 1
        assert pol_w.tokens[row, end - len(got):end].tolist() == got
        assert bool(pol_w.valid[row, end - len(got):end].all())
    assert torch.equal(windows.tokens, raw_w)  # the teacher's windows are untouched
    assert pol_w.tokens.shape[1] == windows.tokens.shape[1] + k
    assert torch.equal(pol_w.targets, windows.targets)


def test_update_rows_are_before_prefix_after_think_thought():
    prompts, windows, thoughts, adv = _inputs()
    t = build_template(CUSTOM, TOK)
    after = TOK.encode("\nThink:")
    assert list(t.before) == TOK.encode("Text: ") and list(t.lead) == after + [TOK.think_start]
    pol_p, _ = apply_template(t, prompts, windows, TOK.pad)
    batch = update_batch(pol_p, thoughts, adv, G, TOK.pad, list(t.lead))
    for r in range(len(adv)):
        b, n = r // G, int(thoughts.lengths[r])
        raw = prompts.tokens[b, -int(prompts.lengths[b]):].tolist()
        want = list(t.before) + raw + list(t.lead) + thoughts.tokens[r, :n].tolist()
        assert batch["tokens"][r, :len(want)].tolist() == want
        # Logits at `index` predict the thought tokens (nothing before `<think>` is scored).
        first = len(want) - n - 1  # the `<think>` column
        assert batch["index"][r, :n].tolist() == list(range(first, first + n))


@pytest.mark.parametrize("micro_batch_size, rows_per_seq", [(0, 6), (3, 3)])
def test_packed_update_equals_unpacked_with_a_template(model, micro_batch_size, rows_per_seq):
    prompts, windows, thoughts, adv = _inputs()
    t = build_template(CUSTOM, TOK)
    prompts, windows = apply_template(t, prompts, windows, TOK.pad)
    rows, lead = len(adv), list(t.lead)
    batch = update_batch(prompts, thoughts, adv, G, TOK.pad, lead)
    mbs = [{k: v[i:i + (micro_batch_size or rows)] for k, v in batch.items()}
           for i in range(0, rows, micro_batch_size or rows)]
    ref_loss, ref = _run(model, rlp_forward_step, mbs, rows)
    packed = packed_update_batches(windows, prompts, thoughts, adv, G, micro_batch_size,
                                   TOK.pad, lead, equal_width=micro_batch_size == 3,
                                   rows_per_seq=rows_per_seq)
    loss, got = _run(model, rlp_forward_step, packed, rows)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert ref.keys() == got.keys() and len(ref) > 5
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_shared_prefill_rollout_equals_per_context_with_a_template(model):
    prompts, windows, _, _ = _inputs()
    t = build_template(CUSTOM, TOK)
    prompts, windows = apply_template(t, prompts, windows, TOK.pad)
    kw = dict(group_size=G, max_thought_tokens=5, temperature=1.0, top_p=1.0,
              think_start=list(t.lead), think_end=TOK.think_end, pad=TOK.pad,
              vocab_size=TOK.vocab_size, seed=3, step=1)
    model.eval()
    try:
        ref = sample_thoughts_chunked(model, prompts, 0, **kw)
        got = sample_thoughts_chunked(model, prompts, 0,
                                      shared=SharedWindows.from_windows(windows, prompts), **kw)
        plain = sample_thoughts_chunked(model, prompts, 0,
                                        **{**kw, "think_start": TOK.think_start})
    finally:
        model.train()
    assert torch.equal(got.tokens, ref.tokens) and torch.equal(got.mask, ref.mask)
    torch.testing.assert_close(got.logprobs, ref.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.s_pred, ref.s_pred, atol=1e-5, rtol=1e-5)
    # The forced tokens matter: without them the same keys give other log-probs.
    assert not torch.allclose(plain.logprobs, ref.logprobs)


def test_hf_tokenizer_template_uses_its_own_think_ids():
    tok = build_tokenizer(str(TINY_BPE))
    t = build_template("paper", tok)
    assert t.lead == (tok.think_start,)
    assert tok._tok.token_to_id("<think>") == tok.think_start  # the vocabulary's id, not added
    assert tok.think_start in t.before and tok.think_end in t.before


def test_bad_templates_are_one_line_config_errors():
    assert parse_template("none") is None
    assert parse_template("a {context} b") == ("a ", " b")
    for bad in ("no placeholder", "{context} twice {context}"):
        with pytest.raises(ConfigError, match=r"rlp\.thought_template=.*\{context\}") as e:
            load_config(None, (f"rlp.thought_template={bad}",))
        assert "\n" not in str(e.value)
    cfg = load_config(None, ("rlp.thought_template=paper",))
    assert cfg.rlp.thought_template == "paper"
    # The instruction counts against the model's sequence length.
    need = 192 + 16 + 2 + len(TOK.encode(PAPER_INSTRUCTION))
    with pytest.raises(ConfigError, match=f">= {need}"):
        load_config(None, ("rlp.thought_template=paper", f"model.max_sequence_length={need - 1}"))
    load_config(None, ("rlp.thought_template=paper", f"model.max_sequence_length={need}"))


def test_knob_config_errors_are_one_line():
    cfg = load_config(None, ())
    assert (cfg.rlp.thought_template, cfg.rlp.kl_coef, cfg.rlp.ntp_loss_coef,
            cfg.train.eval_position_strategy) == ("none", 0.0, 0.0, "uniform")
    for key in ("rlp.kl_coef", "rlp.ntp_loss_coef"):
        for bad in ("-0.1", "inf"):
            with pytest.raises(ConfigError, match=rf"{key}=.*>= 0"):
                load_config(None, (f"{key}={bad}",))
    with pytest.raises(ConfigError, match=r"train.eval_position_strategy='best'"):
        load_config(None, ("train.eval_position_strategy=best",))
    vp = ("parallel.pipeline_model_parallel_size=2",
          "parallel.virtual_pipeline_model_parallel_size=2", "model.hybrid_layer_pattern=*|-|*|-")
    load_config(None, vp)
    with pytest.raises(ConfigError, match=r"rlp.ntp_loss_coef=0.5 .*virtual_pipeline"):
        load_config(None, (*vp, "rlp.ntp_loss_coef=0.5"))
