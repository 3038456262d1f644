"""Worker for test_vocab_parallel_on_cpu.py: run under torchrun with TP = world size."""

import sys

import torch

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.rollout.sampling import sample_tokens
from megatron_rlp.rollout.vocab_parallel import sample_vocab_parallel
from megatron_rlp.scoring.next_token import token_logprobs_vocab_parallel

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
distributed.shutdown()
print(f"rank {rank} ok")
