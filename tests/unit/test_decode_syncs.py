"""No host round trip per decode step: the device-to-host reads of a rollout (`bool(t)`,
`.item()`, `.tolist()`, boolean-mask indexing, ...) do not grow with the thought length.

Counted through a `TorchFunctionMode` over the whole rollout, Megatron's attention and the
Mamba layers included; a bf16 hybrid model (attention, Mamba, MLP). On a GPU each of those
reads is a stream synchronisation. Only the open-thought check every `check_every` steps and
the fixed prefill/force-close work remain.

Not counted, because they are no device reads on a GPU either: `t[bool_mask] = scalar`
(PyTorch dispatches it to `masked_fill_`; Megatron's `vocab_parallel_cross_entropy` does it
for S_pred) and Megatron's RNG tracker comparing the CPU generator's state (a host tensor)
each time attention forks the dropout RNG.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.models.provider import build_model
from megatron_rlp.rollout.thoughts import PromptBatch, sample_thoughts
from megatron_rlp.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
READS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy", "nonzero",
         "cpu"}
INDEXING = {"__getitem__", "__setitem__", "index_put_", "masked_select"}


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS or (name in INDEXING and _has_bool_index(args)):
            if not _masked_fill(name, args) and not _caller().endswith(
                    "tensor_parallel/random.py"):
                self.count += 1
        return getattr(func, "__wrapped__", func)(*args, **kwargs)


def _masked_fill(name: str, args) -> bool:
    """`t[bool_mask] = python scalar`: a masked_fill_, no read."""
    return name == "__setitem__" and len(args) > 2 and isinstance(args[2], (int, float, bool))


def _caller() -> str:
    f = sys._getframe(2)
    while f is not None and "/torch/" in f.f_code.co_filename:
        f = f.f_back
    return "" if f is None else f.f_code.co_filename


def _has_bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@pytest.fixture(scope="module")
def model():
    cfg = load_config(None, (
        "model.hybrid_layer_pattern=M*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.mamba_num_heads=4",
        "model.mamba_head_dim=16", "model.mamba_state_dim=8", "model.mamba_num_groups=2",
        "precision.params_dtype=bf16"))
    distributed.initialize(cfg)
    yield build_model(cfg, TOK.vocab_size).eval()
    distributed.shutdown()


def reads(model, n: int) -> int:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 7), generator=gen)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[1, :3] = False  # one left-padded prompt
    prompts = PromptBatch(tokens=tokens, valid=valid, lengths=valid.sum(1),
                          targets=torch.tensor([5, 6]), context_ids=torch.tensor([0, 1]))
    audit = HostReads()
    with audit:
        # `</think>` cannot close a thought here (think_end = a padded vocabulary id), so every
        # run decodes exactly n steps.
        out = sample_thoughts(model, prompts, group_size=2, max_thought_tokens=n,
                              temperature=0.7, top_p=1.0, think_start=TOK.think_start,
                              think_end=300, pad=TOK.pad, vocab_size=TOK.vocab_size, seed=1,
                              step=1, check_every=64)
    assert int(out.lengths.min()) == n
    return audit.count


def test_host_reads_do_not_grow_with_decode_steps(model):
    short, long = reads(model, 4), reads(model, 12)
    assert short > 0  # the audit sees the prefill's and the final check's reads
    assert long == short, f"{long - short} host reads in 8 extra decode steps"
