"""Worker for test_vocab_parallel.py: run under torchrun with TP = world size.

Sampling and log-probs on vocabulary shards against the full vocabulary; the entropy
scorer's TP reductions (`entropy_vocab_parallel`, `window_entropies` of a TP model whose last
shard holds Megatron's padded ids) against float64 entropies of the gathered logits."""

import sys

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.models.provider import build_model
from megatron_rlp.rollout.sampling import sample_tokens
from megatron_rlp.rollout.vocab_parallel import sample_vocab_parallel, token_logprobs_vocab_parallel
from megatron_rlp.scoring.entropy import entropy_vocab_parallel, window_entropies

tp = int(sys.argv[1])
cfg = load_config(None, (f"parallel.tensor_model_parallel_size={tp}", "model.num_query_groups=6",
                         "model.ffn_hidden_size=512"), world_size=tp)
distributed.initialize(cfg)
rank = torch.distributed.get_rank()
gen = torch.Generator().manual_seed(0)
rows, vocab, padded = 64, 250, 256  # 6 padded ids at the end
logits = torch.randn(rows, padded, generator=gen) * 3
keys = torch.randint(0, 2**31, (rows, 5), generator=gen)
full = logits.clone()
full[:, vocab:] = float("-inf")
want_tok, want_lp = sample_tokens(full, keys, 0.7, 1.0)
shard = logits.chunk(tp, dim=-1)[rank]
tok, lp = sample_vocab_parallel(shard, keys, 0.7, 1.0, vocab)
assert torch.equal(tok, want_tok), (tok, want_tok)
torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-5)
assert int(tok.max()) < vocab
tok_p, _ = sample_vocab_parallel(shard, keys, 0.7, 0.8, vocab)  # top-p: gathered fallback
assert torch.equal(tok_p, sample_tokens(full, keys, 0.7, 0.8)[0])
targets = torch.randint(0, vocab, (rows,), generator=gen)
want = torch.log_softmax(full, -1).gather(1, targets[:, None])[:, 0]
torch.testing.assert_close(token_logprobs_vocab_parallel(shard, targets, vocab), want,
                           rtol=0, atol=1e-5)


def entropy64(x: torch.Tensor, n: int) -> torch.Tensor:
    logp = torch.log_softmax(x[..., :n].double(), -1)
    return -(logp.exp() * logp).sum(-1)


big = logits.clone()
big[:, vocab:] = 8.0  # padded ids with large logits: counting them would move H by > 0.1
got = entropy_vocab_parallel(big.chunk(tp, dim=-1)[rank], vocab)
torch.testing.assert_close(got.double(), entropy64(big, vocab), rtol=0, atol=1e-5)

# A TP model: byte vocabulary 261 padded to 320, the last shard holds the 59 padded ids.
mcfg = load_config(None, (f"parallel.tensor_model_parallel_size={tp}", "model.hidden_size=64",
                          "model.ffn_hidden_size=128", "model.num_attention_heads=4",
                          "model.num_query_groups=2", "model.hybrid_layer_pattern=*-",
                          "model.max_sequence_length=256"), world_size=tp)
model = build_model(mcfg, 261).eval()
windows = [torch.randint(0, 261, (n,), generator=gen).numpy() for n in (5, 23, 14)]
h = window_entropies(model, windows, 261, pad=0)
with torch.no_grad():
    for w, hw in zip(windows, h, strict=True):  # one unpadded forward per window, gathered
        x = torch.from_numpy(w.astype("int64"))[None]
        shard_logits = model(x, torch.arange(x.shape[1])[None], None)[0]
        full_logits = gather_from_tensor_model_parallel_region(shard_logits)
        assert full_logits.shape[-1] == 320
        torch.testing.assert_close(torch.from_numpy(hw).double(), entropy64(full_logits, 261),
                                   rtol=0, atol=2e-5)
distributed.shutdown()
print(f"rank {rank} ok")
