"""Every ValueError / assert a training run can raise, walked: each one that configuration
can reach is refused at start-up (`load_config`, before torch.distributed) with one line
naming the key, and the run-time code raises on the same values (a site that configuration
reaches only on a machine without a feature, e.g. FlexAttention, is checked with the machine
faked); the others are listed with the reason no config reaches them (corpus contents,
reported as one `DataError` line; or an internal shape invariant).

`test_every_raise_site_is_classified` greps the run-path modules, so a new `raise ValueError`
or `assert` fails here until it is classified (and, if config can reach it, checked).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_rlp.config import ConfigError, RunConfig
from megatron_rlp.config.loading import _apply
from megatron_rlp.startup import load_config

ROOT = Path(__file__).resolve().parents[2]
RUN_PATH = ("train", "checkpoint", "data", "rollout", "objective", "scoring", "models",
            "parallel", "tokenizer", "backends", "packing")


def _raw(overrides: tuple[str, ...]) -> RunConfig:
    """The config as the run would see it had start-up not checked it."""
    cfg = RunConfig()
    for item in overrides:
        key, value = item.split("=", 1)
        _apply(cfg, key, value)
    return cfg


def _corpus(length: int = 400, docs: int = 64):
    documents = [np.arange(length, dtype=np.int32) % 200 + 3 for _ in range(docs)]
    return SimpleNamespace(path="corpus", lengths=[length] * docs, documents=documents, eos=1)


def _local_rows(cfg: RunConfig, world: int) -> int:
    p = cfg.parallel
    dp = world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    if cfg.train.objective == "rlp":
        return cfg.rlp.contexts_per_step // dp * cfg.rlp.group_size
    return cfg.data.ntp_batch_size // dp


# --- what the run would call, with the values a config gives it ---------------------------

def _split(cfg, world):
    from megatron_rlp.data.batches import split_microbatches

    split_microbatches({"tokens": torch.zeros(_local_rows(cfg, world), 2)},
                       cfg.train.micro_batch_size)


def _sampler(cfg, world=1, **kw):
    from megatron_rlp.data.contexts import ContextSampler

    r = cfg.rlp
    return ContextSampler(_corpus(), r.min_prefix_tokens, r.max_prefix_tokens, cfg.train.seed,
                          strategy=kw.get("strategy", r.position_strategy),
                          stride=r.position_stride, scorer=lambda w: [np.zeros(len(x)) for x in w],
                          band=r.position_band_tokens)


def _sample(cfg, world=1):
    r = cfg.rlp
    _sampler(cfg).sample(1, r.contexts_per_step, r.positions_per_document)


def _eval(cfg, world=1):
    from megatron_rlp.train.validate import eval_sampler

    eval_sampler(SimpleNamespace(cfg=cfg, valid_corpus=None, tokenizer=None))


def _ntp_batcher(cfg, world=1):
    from megatron_rlp.data.contexts import NTPBatcher

    NTPBatcher(SimpleNamespace(gpt_windows=lambda *a: None), cfg.data.ntp_seq_length, 1)


def _top_p(cfg, world=1):
    from megatron_rlp.rollout.sampling import top_p_mask

    top_p_mask(torch.zeros(2, 8), cfg.rlp.top_p)


def _temperature(cfg, world=1):
    from megatron_rlp.rollout.sampling import token_logprobs

    token_logprobs(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long), cfg.rlp.temperature)


def _surrogate(cfg, world=1):
    from megatron_rlp.objective import clipped_surrogate_loss

    n, t = 2, cfg.rlp.max_thought_tokens
    clipped_surrogate_loss(torch.zeros(n, t), torch.zeros(n, t), torch.zeros(n),
                           torch.ones(n, t, dtype=torch.bool), cfg.rlp.clip_eps_low,
                           cfg.rlp.clip_eps_high)


def _advantages(cfg, world=1):
    from megatron_rlp.objective import group_advantages

    group_advantages(torch.zeros(2, cfg.rlp.group_size))


def _load_data_split(cfg, world=1):
    from megatron_rlp.data.corpus import TokenizedCorpus
    from megatron_rlp.data.indexed import split_corpus

    corpus = TokenizedCorpus(path=Path("c"), documents=[np.arange(9)] * 10, eos=1)
    parts = split_corpus(corpus, cfg.data.split)
    if parts[0] is None:  # load_data's check, indexed.py
        raise ValueError(f"data.split={cfg.data.split!r} leaves no training document")


def _tis(cfg, world=1):
    from megatron_rlp.objective.policy_loss import truncated_importance_weights

    z = torch.zeros(2, 3)
    truncated_importance_weights(z, z, torch.ones(2, 3, dtype=torch.bool), cfg.rlp.tis_cap)


def _policy_loss(cfg, world=1):
    from megatron_rlp.objective.policy_loss import rlp_policy_loss

    z = torch.zeros(2, 3)
    rlp_policy_loss(z, z, torch.zeros(2), torch.ones(2, 3, dtype=torch.bool), 0.2, 0.2,
                    cfg.rlp.logp_old_source, cfg.rlp.tis_cap)


def _transformer_impl(cfg, world=1):
    from megatron_rlp.backends.transformer_engine import resolve_transformer_impl

    resolve_transformer_impl(cfg.model.transformer_impl, cfg.device.type, te_available=False)


def _packed_attention(cfg, world=1):
    from megatron_rlp.packing.flex import resolve

    resolve(cfg.model.packed_attention, cfg.device.type, cfg.model.hybrid_layer_pattern)


# (site: file and a snippet of the raising line(s)) -> the config that reaches it:
# (overrides, world size, key the start-up line names, run-time reproduction or None when
# the raise is inside Megatron / a model build not run here)
CONFIG_REACHABLE = {
    ("data/batches.py", "must divide the"): [
        (("rlp.group_size=3", "train.micro_batch_size=4", "rlp.contexts_per_step=4"), 2,
         "train.micro_batch_size=4", _split),  # issue 14, point 1
        (("train.objective=ntp", "train.micro_batch_size=5"), 1, "train.micro_batch_size=5",
         _split),  # issue 14, point 1
        (("train.objective=ntp", "train.micro_batch_size=4", "data.ntp_batch_size=12"), 2,
         "train.micro_batch_size=4", _split),  # 12 divides, the 6 per rank do not
    ],
    ("train/validate.py", "validation needs a valid split"): [
        (("train.eval_interval=5",), 1, "train.eval_interval=5", _eval)],
    ("data/contexts.py", "need 1 <= min_prefix <= max_prefix"): [
        (("rlp.min_prefix_tokens=100", "rlp.max_prefix_tokens=50"), 1,
         "rlp.min_prefix_tokens=100", _sampler),
        (("rlp.min_prefix_tokens=0",), 1, "rlp.min_prefix_tokens=0", _sampler)],
    ("data/contexts.py", "position strategy"): [
        (("rlp.position_strategy=random",), 1, "rlp.position_strategy='random'",
         lambda cfg, w: _sampler(cfg, strategy="random"))],
    ("data/contexts.py", "stride must be >= 1"): [
        (("rlp.position_stride=0",), 1, "rlp.position_stride=0", _sampler)],
    ("data/contexts.py", "band must be >= 0"): [
        (("rlp.position_band_tokens=-1",), 1, "rlp.position_band_tokens=-1", _sampler)],
    ("data/contexts.py", "must be a positive multiple of"): [
        (("rlp.contexts_per_step=6", "rlp.positions_per_document=4"), 1,
         "rlp.positions_per_document=4", _sample)],
    ("data/contexts.py", "fit one window of max_prefix"): [
        (("rlp.positions_per_document=4", "rlp.position_strategy=stride",
          "rlp.position_stride=64"), 1, "rlp.positions_per_document=4", _sample),
        (("rlp.positions_per_document=8", "rlp.min_prefix_tokens=16",
          "rlp.max_prefix_tokens=20"), 1, "rlp.positions_per_document=8", _sample),
        (("rlp.positions_per_document=8", "rlp.position_band_tokens=4"), 1,
         "rlp.positions_per_document=8", _sample)],
    ("data/contexts.py", "seq_length={seq_length} must be >= 1"): [
        (("data.ntp_seq_length=0", "train.objective=ntp"), 1, "data.ntp_seq_length=0",
         _ntp_batcher)],
    ("data/indexed.py", "leaves no training document"): [
        (("data.split=0,1,0",), 1, "data.split='0,1,0'", _load_data_split)],
    ("rollout/sampling.py", "top_p must be > 0"): [
        (("rlp.top_p=0",), 1, "rlp.top_p=0", _top_p)],
    ("rollout/sampling.py", "temperature must be > 0"): [
        (("rlp.temperature=0",), 1, "rlp.temperature=0", _temperature),
        (("rlp.temperature=-1",), 1, "rlp.temperature=-1", _temperature)],
    ("objective/surrogate.py", "clip ranges must be >= 0"): [
        (("rlp.clip_eps_low=-0.1",), 1, "rlp.clip_eps_low=-0.1", _surrogate),
        (("rlp.clip_eps_high=-1",), 1, "rlp.clip_eps_high=-1", _surrogate)],
    ("objective/surrogate.py", "every thought needs at least one token"): [
        (("rlp.max_thought_tokens=0",), 1, "rlp.max_thought_tokens=0", _surrogate)],
    ("objective/advantages.py", "at least 2 thoughts per context"): [
        (("rlp.group_size=1",), 1, "rlp.group_size=1", _advantages)],
    ("models/mamba/ops.py", "is not a multiple of ngroups"): [
        (("model.hybrid_layer_pattern=M-", "model.mamba_num_groups=5"), 1,
         "model.mamba_num_groups=5", None)],
    ("objective/policy_loss.py", "tis_cap must be > 0"): [
        (("rlp.tis_cap=0",), 1, "rlp.tis_cap=0", _tis)],
    ("objective/policy_loss.py", "logp_old_source must be one of"): [
        (("rlp.logp_old_source=behaviour",), 1, "rlp.logp_old_source='behaviour'",
         _policy_loss)],
    ("backends/transformer_engine.py", "unknown transformer_impl"): [
        (("model.transformer_impl=te",), 1, "model.transformer_impl='te'", _transformer_impl)],
    ("backends/transformer_engine.py", "Transformer Engine layers are CUDA-only"): [
        (("model.transformer_impl=transformer_engine",), 1,
         "model.transformer_impl='transformer_engine'", _transformer_impl)],
    ("packing/flex.py", "an attention-only model.hybrid_layer_pattern"): [
        (("model.packed_attention=flex", "model.hybrid_layer_pattern=M*-",
          "model.mamba_num_groups=2"), 1,
         "model.packed_attention='flex'", _packed_attention)],
    ("backends/transformer_engine.py", "to be importable"): [
        (("model.transformer_impl=transformer_engine",), 1,
         "model.transformer_impl='transformer_engine'",
         lambda cfg, w: _transformer_impl(_raw(("device.type=cuda",
                                                "model.transformer_impl=transformer_engine"))))],
}

# Reached from configuration on a machine that lacks a feature this one has; start-up refuses
# it there. (site) -> (overrides, key, (module, attribute, its value on such a machine),
# run-time reproduction).
MACHINE_REACHABLE = {
    ("packing/flex.py", "flex_attention (torch >= 2.5)"): (
        ("model.packed_attention=flex",), "model.packed_attention='flex'",
        ("megatron_rlp.packing.flex", "HAVE_FLEX", False), _packed_attention),
}

# Raised inside Megatron-Core (no site in this repository), reached from configuration.
MEGATRON_REACHABLE = [
    # forward_backward_pipelining_with_interleaving: micro-batches in groups of PP
    (("parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
      "model.hybrid_layer_pattern=*-|*-|*-|*-", "train.micro_batch_size=32"), 2,
     "train.micro_batch_size=32"),
    # scatter_to_sequence_parallel_region: the sequence splits evenly over TP
    (("train.objective=ntp", "parallel.tensor_model_parallel_size=2",
      "parallel.sequence_parallel=true", "data.ntp_seq_length=33"), 2, "data.ntp_seq_length=33"),
    # RoPE / the static inference context: positions up to max_sequence_length
    (("model.max_sequence_length=100",), 1, "model.max_sequence_length=100"),
    (("train.objective=ntp", "data.ntp_seq_length=600"), 1, "model.max_sequence_length=512"),
    # evaluation samples thoughts in NTP runs too
    (("train.objective=ntp", "data.split=90,10,0", "train.eval_interval=2",
      "model.max_sequence_length=128", "data.ntp_seq_length=64"), 1,
     "model.max_sequence_length=128"),
    # vocabulary, heads, MLP columns split over TP (VocabParallelEmbedding, linear layers)
    (("parallel.tensor_model_parallel_size=3", "model.num_query_groups=3",
      "model.num_attention_heads=6"), 3, "parallel.tensor_model_parallel_size=3"),
    (("parallel.tensor_model_parallel_size=4", "model.num_query_groups=4",
      "model.num_attention_heads=8", "model.make_vocab_size_divisible_by=2"), 4,
     "parallel.tensor_model_parallel_size=4"),
    # initialize_model_parallel: TP x PP divides the world
    (("parallel.pipeline_model_parallel_size=2", "model.hybrid_layer_pattern=*-|*-"), 3,
     "parallel.pipeline_model_parallel_size=2"),
    # global batches sliced evenly over DP (rlp_step.local_contexts, ntp_step, validate)
    (("rlp.contexts_per_step=6",), 4, "rlp.contexts_per_step=6"),
    (("data.ntp_batch_size=6", "train.objective=ntp"), 4, "data.ntp_batch_size=6"),
    (("data.split=90,10,0", "train.eval_interval=1", "train.eval_contexts=6"), 4,
     "train.eval_contexts=6"),
]

# Start-up checks with no raise at run time: the run would go on, with a wrong result.
SILENT = [
    # a document's contexts split over two ranks: each rebuilds its own window (DP-dependent)
    (("rlp.contexts_per_step=4", "rlp.positions_per_document=4"), 2,
     "rlp.positions_per_document=4"),
    # an empty pipeline stage
    (("parallel.pipeline_model_parallel_size=2", "model.hybrid_layer_pattern=*-*-|"), 2,
     "model.hybrid_layer_pattern='*-*-|'"),
]

# Not reachable from configuration: corpus / tokenizer contents (the loop reports them as
# one `DataError` line: train/loop.py `_build`, `_step_fn`), or internal invariants.
DATA = {
    ("data/indexed.py", "tokenized with"), ("data/indexed.py", "split has no document"),
    ("data/indexed.py", "no window of"), ("data/indexed.py", "documents leave the"),
    ("data/corpus.py", "invalid JSON"), ("data/corpus.py", "expected an object"),
    ("data/corpus.py", "no usable document"), ("data/utf8.py", "lone surrogate"),
    ("data/contexts.py", "no document has more than min_prefix"),
    ("data/contexts.py", "documents with at least"),
    ("data/contexts.py", "positions outside thought spans"),
    ("data/contexts.py", "needs at least {seq_length + 1}"),
    ("tokenizer/sentencepiece.py", "no end-of-sequence piece"),
    ("tokenizer/hf.py", "no end-of-sequence token"), ("tokenizer/hf.py", "which is not in the"),
    ("tokenizer/byte.py", "outside the byte vocabulary"),
    ("data/answer_positions.py", "no answer positions"),  # a corpus without answer offsets
}
INVARIANT = {
    ("data/contexts.py", "assert width >= k_span"),  # after the window check above
    ("data/contexts.py", "needs a scorer"),  # samplers.py always passes the teacher's
    ("rollout/sampling.py", "keys must be integer"), ("rollout/sampling.py", "vocab_start"),
    ("rollout/sampling.py", "logits must be [R, V]"), ("rollout/sampling.py", "minus the vocab"),
    ("objective/surrogate.py", "logp_new must be"),
    ("objective/surrogate.py", "must have the same"),
    ("objective/surrogate.py", "advantages must be"),
    ("objective/advantages.py", "rewards must be"),
    ("objective/reward.py", "must have"), ("scoring/ema_teacher.py", "different parameters"),
    # rlp.teacher_scoring is a Literal: start-up refuses any other value (config/loading.py)
    ("scoring/ema_teacher.py", "expected one of"),
    # select_kernels(force=...) is set by the kernel tests only, never by a config
    ("models/mamba/adapter.py", "select_kernels force="),
    ("models/mamba/mixer.py", "sequence_parallel"),  # rollouts run with SP off
    ("models/mamba/mixer.py", "packed_seq_params"), ("models/mamba/mixer.py", "one token per row"),
    ("models/mamba/mixer.py", "is_static_batching"),
    ("models/mamba/elementwise.py", "unsupported activation"),
    ("models/mamba/conv.py", "conv_state holds"), ("models/mamba/ops.py", "headdim is required"),
    ("backends/cpu.py", "assert tensor is not None"),
    ("objective/policy_loss.py", "logp_rollout \" f\"{tuple(logp_rollout.shape)}"),
    ("objective/surrogate.py", "token_weights must be"),
    ("objective/kl.py", "differ"), ("objective/kl.py", "at least one token"),  # update batches
    ("data/answer_positions.py", "one per document"),  # validate samples one per document
    # data/batches.py builds every prefix from its window's first token; no context parallel
    ("models/mamba/branches.py", "first column"),
    ("models/mamba/branches.py", "context_parallel_size == 1"),
    # packing/: models.provider.transformer_config fixes apply_rope_fusion=False and
    # attention_dropout=0, and no config key sets layer scaling, softmax_type or window_size
    ("packing/decode.py", "needs unfused RoPE"), ("packing/rotary.py", "need unfused RoPE"),
    ("packing/flex.py", "does not support {what}"),
    # the packed forward passes no attention bias (add_bias_linear=False) or packed_seq_params
    ("packing/flex.py", "takes no attention bias"),
    # data/batches.py starts every prefix at its window's first token (as branches.py above)
    ("packing/prefill.py", "Mamba layers need every context's prefix"),
    # pack_branches is called without `width` (the plugin pads afterwards): width >= need
    ("packing/tree.py", "packed sequences need"),
    # the packed update runs only where packing.update.packable says the size packs, and
    # rows_per_sequence returns a divisor of that size
    ("packing/update.py", "cannot be packed"),
    # packing.tree.pack_branches lays every packed sequence out as its window (causal from
    # column 0), then each branch contiguous with one prefix inside that window
    ("packing/split_attention.py", "split attention needs packed sequences"),
    ("packing/split_attention.py", "split attention needs contiguous branches"),
    # rollout.thoughts compacts only while 0 < unfinished rows <= the live rows
    ("packing/compiled.py", "need 1 <= n <= rows"),
    # cache lengths are the window + thought widths the engine allocates, always >= 1
    ("packing/compiled.py", "need n >= 1"),
}


def _sites() -> list[tuple[str, str]]:
    """(path under megatron_rlp/, the raising line and the two after it) for every site."""
    found = []
    for part in RUN_PATH:
        for path in sorted((ROOT / "megatron_rlp" / part).rglob("*.py")):
            lines = path.read_text().splitlines()
            for i, line in enumerate(lines):
                if re.match(r"\s*(raise ValueError\b|assert\b)", line):
                    text = " ".join(s.strip() for s in lines[i:i + 3])
                    found.append((str(path.relative_to(ROOT / "megatron_rlp")), text))
    return found


def test_every_raise_site_is_classified():
    known = list(CONFIG_REACHABLE) + list(MACHINE_REACHABLE) + list(DATA) + list(INVARIANT)
    sites = _sites()
    unclassified = [s for s in sites
                    if not any(f == s[0] and snip in s[1] for f, snip in known)]
    assert not unclassified, f"classify these in {Path(__file__).name}: {unclassified}"
    stale = [k for k in known if not any(k[0] == f and k[1] in t for f, t in sites)]
    assert not stale, f"no such site any more: {stale}"


CASES = [pytest.param(*case, id=f"{site[0]}:{'-'.join(case[0])}")
         for site, cases in CONFIG_REACHABLE.items() for case in cases]


@pytest.mark.parametrize("overrides, world, key, runtime", CASES)
def test_config_reachable_raise_is_refused_at_start_up(overrides, world, key, runtime):
    if runtime is not None:  # the run-time code does raise on these values ...
        with pytest.raises(ValueError):
            runtime(_raw(overrides), world)
    with pytest.raises(ConfigError) as err:  # ... and start-up refuses them first
        load_config(None, overrides, world_size=world)
    msg = str(err.value)
    assert "\n" not in msg and key in msg and "allowed" in msg, msg


@pytest.mark.parametrize("site", list(MACHINE_REACHABLE), ids=lambda site: ":".join(site))
def test_machine_reachable_raise_is_refused_at_start_up(site, monkeypatch):
    overrides, key, (module, name, value), runtime = MACHINE_REACHABLE[site]
    monkeypatch.setattr(importlib.import_module(module), name, value)  # such a machine
    with pytest.raises(ValueError):
        runtime(_raw(overrides), 1)
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, world_size=1)
    msg = str(err.value)
    assert "\n" not in msg and key in msg and "allowed" in msg, msg


@pytest.mark.parametrize("overrides, world, key", MEGATRON_REACHABLE + SILENT,
                         ids=["-".join(c[0]) + f"@{c[1]}" for c in MEGATRON_REACHABLE + SILENT])
def test_megatron_and_silent_constraints_are_refused_at_start_up(overrides, world, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, world_size=world)
    msg = str(err.value)
    assert "\n" not in msg and key in msg and "allowed" in msg, msg


def test_valid_neighbours_pass():
    """The checks refuse only what fails: nearby valid settings load."""
    for overrides, world in [
        (("rlp.group_size=3", "train.micro_batch_size=3", "rlp.contexts_per_step=4"), 2),
        (("train.objective=ntp", "train.micro_batch_size=4"), 1),
        (("rlp.contexts_per_step=8", "rlp.positions_per_document=4"), 2),
        (("rlp.rollout_chunk_contexts=4",), 2),
        # a chunk of more contexts than a rank holds is one chunk: valid at any scale
        (("rlp.rollout_chunk_contexts=64",), 2),
        (("train.objective=ntp", "parallel.tensor_model_parallel_size=2",
          "parallel.sequence_parallel=true", "data.ntp_seq_length=32"), 2),
        (("parallel.pipeline_model_parallel_size=2",
          "parallel.virtual_pipeline_model_parallel_size=2",
          "model.hybrid_layer_pattern=*-|*-|*-|*-", "train.micro_batch_size=8"), 2),
    ]:
        cfg = load_config(None, overrides, world_size=world)
        for item in overrides:  # loaded as given: start-up neither refused nor rewrote them
            section, key = item.split("=", 1)[0].split(".")
            assert getattr(getattr(cfg, section), key) == \
                getattr(getattr(_raw((item,)), section), key), item
        if cfg.train.objective == "rlp":  # ... and the run's own checks accept them too
            _split(cfg, world)
            _sample(cfg, world)
