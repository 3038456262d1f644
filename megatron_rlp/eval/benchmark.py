"""Evaluate a policy on a local JSONL benchmark (question, answer), without or with a thought.

For each item the prompt is `prompt_template.format(question=...)`; the gold answer is
`extract_answer(answer)` (so GSM8K's `... #### 72` works as is). Then, per item:

    no thought    n answers: greedy (n = 1) or sampled at `temperature` with keyed noise;
                  with `ban_think` (the fair no-thought baseline) `<think>` may not open the
                  answer, and the first answer token's log-prob is renormalised without it
                  (a model whose corpus opens answers with thoughts would otherwise start one
                  and be scored on the thought's text)
    thought       n thoughts sampled by the rollout (`rollout/thoughts.sample_thoughts`: the
                  prompt, `<think>`, up to `rlp.max_thought_tokens` tokens at
                  `rlp.temperature`, `</think>` given if the policy does not close it), then
                  a greedy answer after each thought
    answers       decoded until a stop text (a newline by default) or `max_new_tokens`, the
                  answer extracted (`answers.extract_answer`) and matched (numeric or exact)
    log-lik       log p(gold answer tokens | prompt [, <think> c </think>]), summed over the
                  answer's tokens, and that of its first token alone (where thinking matters in
                  the generated tasks); with thoughts, the mean over the n thoughts

Metrics: `accuracy` (the mean fraction of correct answers, = pass@1), `pass@k` for every
k <= n (unbiased estimator), `answer_logprob`, `answer_logprob_per_token`,
`first_token_logprob`, `greedy_answer` (the gold answer is the greedy continuation, as
lm-eval's loglikelihood `acc`), `thought_tokens` and `closed_fraction` (thoughts only); all
also per `kind` when items have one.

Layouts: items are dealt to data-parallel ranks (item i to rank i mod DP) and gathered in
item order; TP/PP ranks of one model replica run the same calls. Sampling keys are (seed,
step key, item index, sample index, token index), so results do not depend on the layout,
the batch size or the number of ranks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rlp.data.batches import left_pad
from megatron_rlp.data.corpus import jsonl_records
from megatron_rlp.eval.answers import extract_answer, is_match, pass_at_k
from megatron_rlp.eval.decode import continuation_logprobs, generate, truncate_at_stop
from megatron_rlp.eval.loading import EvalModel
from megatron_rlp.eval.tasks import PROMPT
from megatron_rlp.rollout.template import build_template
from megatron_rlp.rollout.thoughts import PromptBatch, sample_thoughts

THOUGHT_STEP_KEY = -1  # sampling keys of benchmark thoughts (training steps count from 1,
ANSWER_STEP_KEY = -2  # train/validate.py uses 0): never the noise of a training rollout


@dataclass(kw_only=True)
class BenchmarkOptions:
    """How to run a benchmark (every field has a command-line flag in tools/evaluate.py)."""

    prompt_template: str = PROMPT  # "{question}" is replaced by the item's question
    think: bool = False  # sample a thought before answering
    ban_think: bool = False  # no thought: `<think>` banned at the answer start, renormalised
    samples: int = 1  # n answers (or thoughts) per item; pass@k for k <= n
    temperature: float = 0.0  # answer sampling without a thought (0 = greedy; needs n = 1)
    top_p: float = 1.0
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ("\n",)
    match: str = "numeric"  # or "exact"
    extract: str = "first"  # which number of an output is its answer: "first" or "last"
    loglik: bool = True
    batch_size: int = 16  # items per forward (x samples rows with thoughts)
    seed: int | None = None  # None: the run config's train.seed

    def validate(self) -> None:
        """Raises ValueError naming the bad option."""
        if self.samples < 1:
            raise ValueError(f"samples={self.samples} (allowed: >= 1)")
        if not self.think and self.samples > 1 and self.temperature <= 0:
            raise ValueError(f"samples={self.samples} without a thought needs temperature > 0 "
                             "(greedy answers are all the same)")
        if self.match not in ("numeric", "exact") or self.extract not in ("first", "last"):
            raise ValueError(f"match={self.match!r} / extract={self.extract!r} (allowed: "
                             "numeric|exact / first|last)")
        if self.think and self.ban_think:
            raise ValueError("ban_think is the no-thought baseline (it needs think=False)")
        if "{question}" not in self.prompt_template:
            raise ValueError(f"prompt_template={self.prompt_template!r} has no {{question}}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")


def read_benchmark(path: str | Path) -> list[dict]:
    """The items of a JSONL benchmark: objects with string (or number) `question` and
    `answer` fields; other fields are kept.

    Raises:
        ValueError: a line that is not such an object (file and line named), or no item.
    """
    records = []
    for lineno, r in jsonl_records(Path(path)):
        if not (isinstance(r, dict) and isinstance(r.get("question"), str)
                and isinstance(r.get("answer"), (str, int, float))):
            raise ValueError(f'{path}:{lineno}: expected {{"question": str, "answer": ...}}')
        r["answer"] = str(r["answer"])
        records.append(r)
    if not records:
        raise ValueError(f"{path}: no benchmark item")
    return records


def _logmeanexp(xs: Sequence[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs) / len(xs))


def _run_batch(em: EvalModel, opts: BenchmarkOptions, batch: list[tuple[int, dict]],
               seed: int) -> list[dict]:
    """Results of this rank's items `batch` ((global index, record) pairs)."""
    cfg, tok, model = em.cfg, em.tokenizer, em.policy
    n, r = opts.samples, cfg.rlp
    window = cfg.model.max_sequence_length
    device = next(model.parameters()).device
    golds = [extract_answer(rec["answer"], "first") for _, rec in batch]
    answer_ids = [tok.encode(g) or [tok.eos] for g in golds]
    # Room for <think>, a thought, </think> and the answer (or the generated tokens).
    room = window - max(opts.max_new_tokens, max(map(len, answer_ids))) - 1
    # Thoughts in the run's format (`rlp.thought_template`): its instruction before the
    # prompt, its forced tokens and `<think>` after it (rollout/template.py).
    template = build_template(r.thought_template, tok)
    if opts.think:
        room -= r.max_thought_tokens + 2 + template.extra_tokens
    if room < 1:
        raise ValueError(f"model.max_sequence_length={window} leaves no room for a prompt")
    prompts = [tok.encode(opts.prompt_template.format(question=rec["question"]))[-room:]
               for _, rec in batch]
    ids = torch.tensor([i for i, _ in batch], dtype=torch.long)
    common = dict(max_sequence_length=window, vocab_size=tok.vocab_size, pad=tok.pad)
    banned = [tok.think_start] if opts.ban_think else []

    thought_rows = None
    if opts.think:
        policy_prompts = [list(template.before) + p for p in prompts]
        tokens, valid = left_pad(policy_prompts, tok.pad)
        pb = PromptBatch(tokens=tokens.to(device), valid=valid.to(device),
                         lengths=valid.sum(1).to(device),
                         targets=torch.tensor([a[0] for a in answer_ids], device=device),
                         context_ids=ids.to(device))
        th = sample_thoughts(model, pb, group_size=n, max_thought_tokens=r.max_thought_tokens,
                             temperature=r.temperature, top_p=r.top_p,
                             think_start=list(template.lead), think_end=tok.think_end,
                             pad=tok.pad, vocab_size=tok.vocab_size, seed=seed,
                             step=THOUGHT_STEP_KEY)
        thought_rows = []
        for row in range(len(batch) * n):
            thought = th.tokens[row][th.mask[row]].tolist()
            closing = [] if bool(th.closed[row]) else [tok.think_end]
            thought_rows.append((list(template.lead) + thought + closing, thought,
                                 bool(th.closed[row])))
        answer_prompts = [policy_prompts[row // n] + thought_rows[row][0]
                          for row in range(len(th.tokens))]
        outputs = generate(model, answer_prompts, max_new_tokens=opts.max_new_tokens,
                           stop_ids=[tok.eos], stop_texts=opts.stop, decode=tok.decode, **common)
    else:
        rows = [p for p in prompts for _ in range(n)]
        keys = None
        if opts.temperature > 0:
            keys = torch.stack([torch.full((len(rows),), seed), torch.full((len(rows),),
                                ANSWER_STEP_KEY), ids.repeat_interleave(n),
                                torch.arange(n).repeat(len(batch))], 1)
        outputs = generate(model, rows, max_new_tokens=opts.max_new_tokens, stop_ids=[tok.eos],
                           stop_texts=opts.stop, decode=tok.decode, temperature=opts.temperature,
                           top_p=opts.top_p, keys=keys, ban_first=banned, **common)

    lls = greedy = None
    if opts.loglik and opts.think:  # one score per thought
        lls, greedy = continuation_logprobs(
            model, answer_prompts, [answer_ids[row // n] for row in range(len(answer_prompts))],
            **common)
    elif opts.loglik:  # the n sampled answers share one prompt: score it once
        lls, greedy = continuation_logprobs(model, prompts, answer_ids, ban_first=banned,
                                            **common)
        lls = [lp for lp in lls for _ in range(n)]
        greedy = [g for g in greedy for _ in range(n)]

    results = []
    for b, (index, rec) in enumerate(batch):
        texts = [truncate_at_stop(tok.decode(outputs[b * n + g]), opts.stop) for g in range(n)]
        preds = [extract_answer(t, opts.extract) for t in texts]
        correct = [is_match(p, golds[b], opts.match) for p in preds]
        res = {"index": index, "kind": rec.get("kind"), "gold": golds[b], "outputs": texts,
               "predictions": preds, "correct": correct}
        if lls is not None:
            sums = [sum(lls[b * n + g]) for g in range(n)]
            firsts = [lls[b * n + g][0] for g in range(n)]
            res.update(answer_logprob=sum(sums) / n, answer_logprob_marginal=_logmeanexp(sums),
                       first_token_logprob=sum(firsts) / n, answer_tokens=len(answer_ids[b]),
                       greedy_answer=sum(greedy[b * n: b * n + n]) / n)
        if thought_rows is not None:
            mine = thought_rows[b * n: b * n + n]
            res.update(thoughts=[tok.decode(t[1]) for t in mine],
                       thought_ids=[t[1] for t in mine],
                       thought_tokens=sum(len(t[1]) for t in mine) / n,
                       closed_fraction=sum(t[2] for t in mine) / n)
        results.append(res)
    return results


def _summary(results: list[dict], n: int) -> dict:
    out = {"items": len(results)}
    c = [sum(r["correct"]) for r in results]
    out["accuracy"] = sum(ci / n for ci in c) / len(results)
    for k in sorted({1, 2, 4, 8, 16, 32, 64, n}):
        if k <= n:
            out[f"pass@{k}"] = sum(pass_at_k(n, ci, k) for ci in c) / len(results)
    for key in ("answer_logprob", "answer_logprob_marginal", "first_token_logprob",
                "greedy_answer", "thought_tokens", "closed_fraction"):
        if key in results[0]:
            out[key] = sum(r[key] for r in results) / len(results)
    if "answer_logprob" in results[0]:
        out["answer_logprob_per_token"] = (sum(r["answer_logprob"] for r in results)
                                           / sum(r["answer_tokens"] for r in results))
    return out


def run_benchmark(em: EvalModel, records: list[dict], opts: BenchmarkOptions
                  ) -> tuple[dict, list[dict]]:
    """Evaluate `em` on `records` (collective over all ranks).

    Returns:
        (metrics, per-item results in item order), the same on every rank. Metrics hold the
        overall values and, when items have a `kind`, `by_kind: {kind: metrics}`.

    Raises:
        ValueError: bad options, or a window too small for the prompts.
    """
    opts.validate()
    seed = em.cfg.train.seed if opts.seed is None else opts.seed
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    mine = [(i, rec) for i, rec in enumerate(records) if i % dp == rank]
    results = []
    for start in range(0, max(len(mine), 1), opts.batch_size):
        batch = mine[start:start + opts.batch_size]
        # Ranks may hold one item fewer: an empty batch still joins no collective, and the
        # model-parallel peers of this rank hold the very same items.
        if batch:
            results += _run_batch(em, opts, batch, seed)
    if dp > 1:
        parts = [None] * dp
        dist.all_gather_object(parts, results, group=parallel_state.get_data_parallel_group())
        results = [r for part in parts for r in part]
    results.sort(key=lambda r: r["index"])
    metrics = _summary(results, opts.samples)
    kinds = defaultdict(list)
    for res in results:
        if res["kind"] is not None:
            kinds[res["kind"]].append(res)
    if kinds:
        metrics["by_kind"] = {k: _summary(v, opts.samples) for k, v in sorted(kinds.items())}
    return metrics, results
