"""The step FLOP model (train/flops.py) in closed form equals the per-token sums it replaced,
and the NTP count is 3 x the forward of its windows."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron_rlp.train.flops import ModelDims, _forward, ntp_flops, step_flops

DIMS = ModelDims(linear_weights=1000, attention_layers=2, attn_width=64, hidden=32, vocab=320)


def _loop_reference(d: ModelDims, trace: dict) -> dict[str, float]:
    """The per-token loops of the former tools/bench_rlp_flops.py."""
    prompts, windows, thoughts = trace["prompts"], trace["windows"], trace["thoughts"]
    win = windows.valid.sum(1).tolist()
    win_tokens, win_pairs = sum(win), sum(n * (n + 1) // 2 for n in win)
    p = prompts.lengths.tolist()
    g = len(thoughts.lengths) // len(p)
    n_rows, closed = thoughts.lengths.tolist(), thoughts.closed.tolist()
    prefill = _forward(d, win_tokens + len(p), win_pairs + sum(x + 1 for x in p), len(p))
    dec_tokens = dec_pairs = upd_tokens = upd_pairs = 0
    for r, n in enumerate(n_rows):
        pk = p[r // g]
        fed = n + (0 if closed[r] else 1)
        dec_tokens += fed
        dec_pairs += sum(pk + 2 + j for j in range(fed))
        upd_tokens += n
        upd_pairs += sum(pk + 1 + j for j in range(n))
    out = {"prefill": prefill, "decode": _forward(d, dec_tokens, dec_pairs, dec_tokens),
           "scoring": _forward(d, win_tokens, win_pairs, len(p)),
           "update": 3.0 * _forward(d, win_tokens + upd_tokens, win_pairs + upd_pairs,
                                    sum(n_rows))}
    out["step"] = sum(out.values())
    return out


def test_closed_forms_equal_the_token_loops():
    gen = torch.Generator().manual_seed(0)
    contexts, g = 6, 4
    trace = {
        "prompts": SimpleNamespace(lengths=torch.randint(1, 90, (contexts,), generator=gen)),
        "windows": SimpleNamespace(valid=torch.rand(3, 120, generator=gen) < 0.7),
        "thoughts": SimpleNamespace(
            lengths=torch.randint(0, 17, (contexts * g,), generator=gen),
            closed=torch.rand(contexts * g, generator=gen) < 0.5),
    }
    got, want = step_flops(DIMS, trace), _loop_reference(DIMS, trace)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == want[k], k


def test_ntp_is_three_forwards_of_causal_windows():
    rows, seq = 4, 32
    forward = (2 * DIMS.linear_weights * rows * seq
               + 4 * DIMS.attention_layers * DIMS.attn_width * rows * seq * (seq + 1) // 2
               + 2 * DIMS.hidden * DIMS.vocab * rows * seq)
    assert ntp_flops(DIMS, rows, seq) == 3 * forward


def test_peak_tflops_by_card_name_and_none_elsewhere():
    from megatron_rlp.train.flops import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA GB200") == 2500.0 and peak_tflops("NVIDIA B200") == 2250.0
    assert peak_tflops("cpu") is None and peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_step_line_shows_mfu_on_a_known_card(monkeypatch, capsys):
    from megatron_rlp.train import metrics

    monkeypatch.setattr(metrics, "_device_peak_tflops", lambda: 1000.0)
    logger = metrics.MetricsWriter(None, "rlp", progress=False)
    logger.log(3, {"loss": 0.5, "flops": 2e14, "step_time": 0.5}, console=True)
    out = capsys.readouterr().out
    assert "TFLOP/s/GPU 400" in out and "MFU 40.0%" in out, out
    monkeypatch.setattr(metrics, "_device_peak_tflops", lambda: None)
    logger.log(4, {"loss": 0.5, "flops": 2e14, "step_time": 0.5}, console=True)
    assert "MFU" not in capsys.readouterr().out
