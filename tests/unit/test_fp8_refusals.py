"""The FP8 holes of issue 27, closed without TE or a GPU: `precision.fp8_param_gather` and
`precision.fp8_rollouts` refused in one line each (why: models/fp8.py), and the `entropy`
position strategy's scorer, in training and in the held-out evaluation's sampler, running
its forward under `rollout_precision` (bf16 under FP8 training) like the rollouts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from megatron.core.transformer import TransformerConfig

from megatron_rlp.config import ConfigError, RunConfig
from megatron_rlp.config.loading import _apply
from megatron_rlp.scoring import entropy
from megatron_rlp.startup import load_config
from megatron_rlp.train import samplers, validate

FP8 = ("device.type=cuda", "precision.params_dtype=bf16", "precision.fp8=hybrid")


@pytest.mark.parametrize("key, why", [
    ("precision.fp8_param_gather", "would quantise CPU parameters"),
    ("precision.fp8_rollouts", "row counts that are multiples of 16"),
])
def test_refused_in_one_line_before_the_machine_is_probed(key, why, monkeypatch):
    """Refused by the pure rules, so on any machine (TE and the GPU are never asked)."""
    from megatron_rlp.backends import transformer_engine as te

    def probe():
        raise AssertionError("the machine was probed before the pure rule refused")

    monkeypatch.setattr(te, "transformer_engine_available", probe)
    with pytest.raises(ConfigError) as err:
        load_config(None, FP8 + (f"{key}=true",))
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"invalid config: {key}=True (allowed: false:")
    assert why in text


class _Model(torch.nn.Module):
    """Holds a Megatron config whose `fp8` a forward would read."""

    def __init__(self):
        super().__init__()
        self.config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
        self.config.fp8 = "hybrid"  # set after __post_init__: no TE needed to hold it
        self.weight = torch.nn.Parameter(torch.zeros(1))


def _state(fp8_rollouts: bool, strategy: str = "entropy"):
    cfg = RunConfig()
    for item in ("precision.params_dtype=bf16", "precision.fp8=hybrid",
                 f"train.eval_position_strategy={strategy}", f"rlp.position_strategy={strategy}"):
        key, value = item.split("=")
        _apply(cfg, key, value)
    cfg.precision.fp8_rollouts = fp8_rollouts  # the switch itself (refused at start-up today)
    corpus = SimpleNamespace(path="c", lengths=[300] * 4, eos=1,
                             documents=[np.arange(300, dtype=np.int32) % 50 + 3] * 4)
    return SimpleNamespace(cfg=cfg, teacher=None, policy=_Model(), corpus=corpus,
                           valid_corpus=corpus,
                           tokenizer=SimpleNamespace(vocab_size=64, pad=0, think_start=1,
                                                     think_end=2))


@pytest.mark.parametrize("fp8_rollouts, inside", [(False, None), (True, "hybrid")])
def test_entropy_scorers_run_under_rollout_precision(fp8_rollouts, inside, monkeypatch):
    """The FP8 switch a scorer's forward sees: off (bf16) unless fp8_rollouts, restored
    after; for the training sampler and the evaluation sampler alike."""
    seen = []

    def forward(model, windows, vocab_size, pad):
        seen.append(model.config.fp8)
        return [np.zeros(len(w)) for w in windows]

    monkeypatch.setattr(entropy, "window_entropies", forward)
    state = _state(fp8_rollouts)
    for sampler in (samplers.make_context_sampler(state), validate.eval_sampler(state)):
        assert sampler.scorer is not None
        sampler.scorer([np.arange(10)])
        assert state.policy.config.fp8 == "hybrid"  # restored
    assert seen == [inside, inside]
