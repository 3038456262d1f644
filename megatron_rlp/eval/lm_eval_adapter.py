"""An lm-eval (0.4.x) model for megatron-rlp checkpoints: `--model megatron-rlp`.

    torchrun --nproc-per-node 2 -m lm_eval --model megatron-rlp \
        --model_args "load=runs/demo/ntp,overrides=device.num_threads=1" \
        --include_path runs/tasks/lm_eval --tasks rlp_heldout_gen,rlp_heldout_ll
    # or: python tools/evaluate.py ... for the project's own benchmark runner

(`import megatron_rlp.eval.lm_eval_adapter` registers the name; `tools/lm_eval_rlp.py` is
lm-eval's CLI with that import done.) Local task files (`tools/make_tasks.py` writes two
over the held-out split) need no download at run time.

The requests lm-eval sends map onto the evaluation code of this package:

    loglikelihood          `decode.continuation_logprobs`: one forward over context +
                           continuation; (sum of log-probs, every token the argmax)
    loglikelihood_rolling  the same over lm-eval's rolling windows of `max_length` tokens
    generate_until         `decode.generate` on the rollout's KV-cache engine: greedy, or
                           sampled with keyed noise when `do_sample` and temperature > 0;
                           cut at the first `until` text, at most `max_gen_toks` tokens

With `think=true` a thought is sampled first (`rollout/thoughts.sample_thoughts`, the run's
`rlp.max_thought_tokens` and `rlp.temperature`), `<think> c </think>` goes after the context,
then the continuation is scored or generated: the thinking variants of both metrics. Thought
noise is keyed by a hash of the context tokens (`context_key`): a context gets the same
thought on any rank and in any batch, and all continuations of one context (multiple-choice
options) are scored after the same thought.

Layouts: lm-eval deals requests to `rank` of `world_size`, which are the data-parallel rank
and size here, so tensor/pipeline-parallel peers receive the same requests and run the same
collectives; results are gathered over the data-parallel group.

lm-eval is an optional dependency (the `eval` extra); importing this module without it
raises ImportError with the install line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the lm-eval adapter needs lm-eval: pip install -e '.[eval]'") from e

from megatron_rlp.data.batches import left_pad
from megatron_rlp.eval.benchmark import ANSWER_STEP_KEY, THOUGHT_STEP_KEY
from megatron_rlp.eval.decode import continuation_logprobs, generate, truncate_at_stop
from megatron_rlp.eval.loading import EvalModel
from megatron_rlp.rollout.template import build_template
from megatron_rlp.rollout.thoughts import PromptBatch, sample_thoughts


def context_key(ids: Sequence[int]) -> int:
    """A sampling key for a thought after `ids`: a hash of the context tokens (62 bits), so
    a context gets the same thought on any rank, in any batch, and all continuations of one
    context (e.g. multiple-choice options) are scored after the same thought."""
    digest = hashlib.sha256(json.dumps(list(map(int, ids))).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("megatron-rlp", "megatron_rlp")
class MegatronRLPLM(TemplateLM):
    """lm-eval's LM interface over a megatron-rlp policy.

    Args (lm-eval `--model_args`, all strings there):
        load: a `train.save` directory or `step_*` checkpoint (or give `config`).
        config: a YAML run config (without `load`: a freshly initialised model).
        overrides: space-separated `section.key=value` config overrides.
        batch_size: requests per forward.
        think: sample a thought before scoring or generating.
        max_gen_toks: default generation limit.
        seed: sampling seed (default: the run's `train.seed`).
        eval_model: an already built `EvalModel` (programmatic use and tests; then
            torch.distributed and Megatron's groups must already be initialised).
    """

    backend = "causal"

    def __init__(self, load: str | None = None, config: str | None = None, overrides: str = "",
                 batch_size: int | str = 8, think: bool | str = False,
                 max_gen_toks: int | str = 256, seed: int | str | None = None,
                 eval_model: EvalModel | None = None, **_ignored) -> None:
        super().__init__()
        if eval_model is None:
            eval_model = self._build(load, config, tuple(overrides.split()))
        self.em = eval_model
        self.tok = eval_model.tokenizer
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.think = _flag(think)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = eval_model.cfg.train.seed if seed in (None, "") else int(seed)
        from megatron.core import parallel_state

        self._rank = parallel_state.get_data_parallel_rank()
        self._world_size = parallel_state.get_data_parallel_world_size()
        self._group = parallel_state.get_data_parallel_group()
        self._device = next(self.em.policy.parameters()).device

    @staticmethod
    def _build(load, config, overrides) -> EvalModel:
        from megatron_rlp import distributed
        from megatron_rlp.eval.loading import eval_config, load_eval_model

        cfg = eval_config(load, config, overrides, int(os.environ.get("WORLD_SIZE", "1")))
        distributed.initialize(cfg)
        return load_eval_model(cfg, load, cfg.train.checkpoint_checksums)

    # ---- the tokenizer surface lm-eval's TemplateLM uses ----

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos

    @property
    def max_length(self) -> int:
        return self.em.cfg.model.max_sequence_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.name)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs
                   ) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens)

    # ---- thoughts ----

    def _with_thoughts(self, contexts: list[list[int]], targets: Sequence[int]
                       ) -> list[list[int]]:
        """`context <think> c </think>` for one thought per row, keyed by `context_key`
        (`targets`: the token the rollout's S_pred scores; not used here)."""
        r, tok = self.em.cfg.rlp, self.tok
        template = build_template(r.thought_template, tok)  # the run's thought format
        room = self.max_length - r.max_thought_tokens - 2 - 1 - template.extra_tokens
        contexts = [list(template.before) + c[-room:] for c in contexts]
        ids = [context_key(c) for c in contexts]
        tokens, valid = left_pad(contexts, tok.pad)
        d = self._device
        pb = PromptBatch(tokens=tokens.to(d), valid=valid.to(d), lengths=valid.sum(1).to(d),
                         targets=torch.tensor(list(targets), device=d),
                         context_ids=torch.tensor(list(ids), device=d))
        th = sample_thoughts(self.em.policy, pb, group_size=1,
                             max_thought_tokens=r.max_thought_tokens, temperature=r.temperature,
                             top_p=r.top_p, think_start=list(template.lead),
                             think_end=tok.think_end,
                             pad=tok.pad, vocab_size=tok.vocab_size, seed=self.seed,
                             step=THOUGHT_STEP_KEY)
        out = []
        for row, ctx in enumerate(contexts):
            thought = th.tokens[row][th.mask[row]].tolist()
            closing = [] if bool(th.closed[row]) else [tok.think_end]
            out.append(ctx + list(template.lead) + thought + closing)
        return out

    # ---- requests ----

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        results = []
        common = dict(max_sequence_length=self.max_length, vocab_size=self.tok.vocab_size,
                      pad=self.tok.pad)
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            contexts = [list(ctx) for _, ctx, _ in batch]
            conts = [list(cont) for _, _, cont in batch]
            if self.think:
                contexts = self._with_thoughts(contexts, [c[0] for c in conts])
            lps, greedy = continuation_logprobs(self.em.policy, contexts, conts, **common)
            for (key, _, _), lp, g in zip(batch, lps, greedy, strict=True):
                results.append((float(sum(lp)), bool(g)))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[-1])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1, context_len=1)]
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(lp for lp, _ in scored))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        tok = self.tok
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # batch requests with the same generation settings
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            kw = dict(requests[members[0]].args[1])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            for start in range(0, len(members), self.batch_size):
                rows = members[start:start + self.batch_size]
                contexts = [self.tok_encode(requests[i].args[0]) or [tok.eos] for i in rows]
                if self.think:
                    contexts = self._with_thoughts(contexts, [tok.eos] * len(rows))
                keys = None
                if temperature > 0:
                    keys = torch.tensor([[self.seed, ANSWER_STEP_KEY, context_key(c)]
                                         for c in contexts])
                outs = generate(self.em.policy, contexts, max_new_tokens=max_new,
                                max_sequence_length=self.max_length, vocab_size=tok.vocab_size,
                                pad=tok.pad, stop_ids=[tok.eos], stop_texts=until,
                                decode=tok.decode, temperature=temperature,
                                top_p=float(kw.get("top_p", 1.0)), keys=keys)
                for i, ids in zip(rows, outs, strict=True):
                    ids = ids[:-1] if ids and ids[-1] == tok.eos else ids
                    results[i] = truncate_at_stop(tok.decode(ids), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results

    # ---- data-parallel gathering for lm-eval's evaluator ----

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self._group)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self._world_size == 1:
            return [obj]
        parts = [None] * self._world_size
        dist.all_gather_object(parts, obj, group=self._group)
        return parts if self._rank == dst else None

    def barrier(self) -> None:
        if self._world_size > 1:
            dist.barrier(group=self._group)
