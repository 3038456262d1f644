"""Evaluation decoding, answer log-likelihoods, benchmark runs and the lm-eval adapter on a
tiny freshly initialised HybridModel (one-process gloo group, fp32): mechanics only, every
quantity recomputed from plain full forwards over unpadded sequences."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from megatron_rlp import distributed
from megatron_rlp.config import load_config
from megatron_rlp.eval.answers import pass_at_k
from megatron_rlp.eval.benchmark import BenchmarkOptions, run_benchmark
from megatron_rlp.eval.decode import continuation_logprobs, generate
from megatron_rlp.eval.loading import EvalModel
from megatron_rlp.eval.tasks import benchmark_record, items
from megatron_rlp.models.provider import build_model
from megatron_rlp.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
VOCAB = TOK.vocab_size
WINDOW = 128
ATOL = 1e-4


@pytest.fixture(scope="module")
def em():
    cfg = load_config(None, (
        "model.hybrid_layer_pattern=*-*-", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_attention_heads=4", "model.num_query_groups=2",
        f"model.max_sequence_length={WINDOW}", "rlp.max_prefix_tokens=64",
        "rlp.max_thought_tokens=6", "rlp.temperature=1.0",
    ))
    distributed.initialize(cfg)
    torch.manual_seed(0)
    yield EvalModel(cfg=cfg, tokenizer=TOK, policy=build_model(cfg, VOCAB).eval(),
                    source="fresh initialisation")
    distributed.shutdown()


def logprobs(model, ids: list[int]) -> torch.Tensor:
    """[n, VOCAB] float64 log-softmax of a plain causal forward over one unpadded sequence
    (Megatron's padded vocabulary left out)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    with torch.no_grad():
        out = model(ids[None], torch.arange(len(ids))[None], None)[0]
    return torch.log_softmax(out[:, :VOCAB].double(), -1)


def direct_continuation(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    lp = logprobs(model, ctx + cont)[len(ctx) - 1: -1]
    target = torch.tensor(cont)
    return float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(1) == target).all())


def greedy_reference(model, ids: list[int], n: int, stop: int) -> list[int]:
    out = []
    for _ in range(n):
        nxt = int(logprobs(model, ids + out)[-1].argmax())
        out.append(nxt)
        if nxt == stop:
            break
    return out


PROMPTS = [TOK.encode(t) for t in ("Question: What is 12 + 30?\nAnswer: ", "Hi", "abc def ghi")]


def test_greedy_generation_equals_full_forward_argmax(em):
    out = generate(em.policy, PROMPTS, max_new_tokens=7, max_sequence_length=WINDOW,
                   vocab_size=VOCAB, pad=TOK.pad)
    assert out == [greedy_reference(em.policy, p, 7, stop=-1) for p in PROMPTS]
    # a stop id ends a row (kept), the others run on
    stop = out[0][2]
    stopped = generate(em.policy, PROMPTS, max_new_tokens=7, max_sequence_length=WINDOW,
                       vocab_size=VOCAB, pad=TOK.pad, stop_ids=[stop])
    for row, full in zip(stopped, out, strict=True):
        want = full[: full.index(stop) + 1] if stop in full else full
        assert row == want


def test_stop_texts_end_rows_and_sampling_is_keyed(em):
    full = generate(em.policy, PROMPTS, max_new_tokens=8, max_sequence_length=WINDOW,
                    vocab_size=VOCAB, pad=TOK.pad)
    text = TOK.decode(full[0])
    stop = TOK.decode(full[0][3:5])
    cut = generate(em.policy, PROMPTS[:1], max_new_tokens=8, max_sequence_length=WINDOW,
                   vocab_size=VOCAB, pad=TOK.pad, stop_texts=[stop], decode=TOK.decode)[0]
    assert stop in TOK.decode(cut) and len(cut) <= 5 and full[0][:len(cut)] == cut
    assert text.startswith(TOK.decode(cut))
    keys = torch.tensor([[1, 2, 10], [1, 2, 11], [1, 2, 12]])
    kw = dict(max_new_tokens=6, max_sequence_length=WINDOW, vocab_size=VOCAB, pad=TOK.pad,
              temperature=1.0)
    batch = generate(em.policy, PROMPTS, keys=keys, **kw)
    alone = generate(em.policy, PROMPTS[1:2], keys=keys[1:2], **kw)
    assert alone[0] == batch[1]  # a row's draws depend on its keys, not on the batch
    other = generate(em.policy, PROMPTS, keys=keys + torch.tensor([0, 0, 100]), **kw)
    assert other != batch
    with pytest.raises(ValueError, match="keys"):
        generate(em.policy, PROMPTS, **kw)


def test_continuation_logprobs_equal_a_direct_forward(em):
    ctxs = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    conts = [TOK.encode("42"), TOK.encode(" there, friend"), TOK.encode("!")]
    greedy = greedy_reference(em.policy, ctxs[2], 3, stop=-1)
    ctxs.append(ctxs[2])
    conts.append(greedy)
    lps, flags = continuation_logprobs(em.policy, ctxs, conts, max_sequence_length=WINDOW,
                                       vocab_size=VOCAB, pad=TOK.pad)
    for ctx, cont, lp, flag in zip(ctxs, conts, lps, flags, strict=True):
        want, want_flag = direct_continuation(em.policy, ctx, cont)
        assert len(lp) == len(cont) and sum(lp) == pytest.approx(want, abs=ATOL * len(cont))
        assert flag is want_flag
    assert flags[3] is True
    # a context longer than the window loses its start, as the window would
    long = list(range(65, 91)) * 6
    (lp,), _ = continuation_logprobs(em.policy, [long], [[50, 51]], max_sequence_length=WINDOW,
                                     vocab_size=VOCAB, pad=TOK.pad)
    want, _ = direct_continuation(em.policy, long[-(WINDOW - 2):], [50, 51])
    assert sum(lp) == pytest.approx(want, abs=ATOL)


def records(n: int) -> list[dict]:
    """The first n held-out items of the generated task (kinds in turn)."""
    return [benchmark_record(item) for item in islice(items(3, held_out=True), n)]


def test_benchmark_metrics_follow_from_the_items(em):
    recs = records(5)
    opts = BenchmarkOptions(samples=3, temperature=1.0, batch_size=2, max_new_tokens=4)
    metrics, results = run_benchmark(em, recs, opts)
    assert [r["index"] for r in results] == list(range(5))
    assert metrics["accuracy"] == pytest.approx(
        sum(sum(r["correct"]) / 3 for r in results) / 5)
    assert metrics["pass@2"] == pytest.approx(
        sum(pass_at_k(3, sum(r["correct"]), 2) for r in results) / 5)
    assert metrics["pass@1"] <= metrics["pass@2"] <= metrics["pass@3"]
    assert set(metrics["by_kind"]) == {"add", "chain", "lookup"}
    # the log-likelihood is the gold answer's, after the prompt, from a direct forward
    r0 = results[0]
    want, _ = direct_continuation(em.policy, TOK.encode(opts.prompt_template.format(
        question=recs[0]["question"])), TOK.encode(recs[0]["answer"]))
    assert r0["answer_logprob"] == pytest.approx(want, abs=ATOL * 4)
    assert r0["first_token_logprob"] >= r0["answer_logprob"] - 1e-6
    # the same answers with another batch size (keyed sampling)
    again, results2 = run_benchmark(em, recs, BenchmarkOptions(
        samples=3, temperature=1.0, batch_size=5, max_new_tokens=4))
    assert [r["outputs"] for r in results2] == [r["outputs"] for r in results]


def test_benchmark_with_thoughts(em):
    recs = records(3)
    metrics, results = run_benchmark(em, recs, BenchmarkOptions(think=True, samples=2,
                                                                max_new_tokens=4))
    assert 0 < metrics["thought_tokens"] <= 6 and 0 <= metrics["closed_fraction"] <= 1
    r = results[1]
    assert len(r["thoughts"]) == 2 and len(r["outputs"]) == 2
    # log-lik with a thought: the answer after `prompt <think> c </think>`, per thought
    prompt = TOK.encode(BenchmarkOptions().prompt_template.format(question=recs[1]["question"]))
    per = []
    for ids in r["thought_ids"]:
        closing = [] if ids and ids[-1] == TOK.think_end else [TOK.think_end]
        per.append(direct_continuation(em.policy, prompt + [TOK.think_start] + ids + closing,
                                       TOK.encode(recs[1]["answer"]))[0])
    assert r["answer_logprob"] == pytest.approx(sum(per) / 2, abs=1e-3)
    _, again = run_benchmark(em, recs, BenchmarkOptions(think=True, samples=2,
                                                        max_new_tokens=4, batch_size=1))
    assert [x["thoughts"] for x in again] == [x["thoughts"] for x in results]


def test_fair_baseline_bans_think_and_renormalises(em):
    """`ban_think`: the first answer token is the argmax without the banned ids, and its
    log-prob is log p(a) - log(1 - p(banned)), from a direct float64 forward."""
    recs = records(4)
    prompts = [TOK.encode(BenchmarkOptions().prompt_template.format(question=r["question"]))
               for r in recs]
    raw = [logprobs(em.policy, p)[-1] for p in prompts]  # [VOCAB] float64 each
    # Ban `<think>` and, so that the ban changes the output, each row's raw greedy token.
    for p, lp in zip(prompts, raw, strict=True):
        banned = [TOK.think_start, int(lp.argmax())]
        fair = lp.clone()
        fair[banned] = float("-inf")
        fair = fair - torch.logsumexp(fair, 0)
        assert abs(float(fair.exp().sum()) - 1) < 1e-9
        (out,) = generate(em.policy, [p], max_new_tokens=2, max_sequence_length=WINDOW,
                          vocab_size=VOCAB, pad=TOK.pad, ban_first=banned)
        assert out[0] == int(fair.argmax()) and out[0] not in banned
        cont = [int(fair.argmax()), 50]
        (lps,), (flag,) = continuation_logprobs(em.policy, [p], [cont], ban_first=banned,
                                                max_sequence_length=WINDOW, vocab_size=VOCAB,
                                                pad=TOK.pad)
        second = float(logprobs(em.policy, p + cont[:1])[-1][50])  # only the first is renormalised
        assert lps[0] == pytest.approx(float(fair[cont[0]]), abs=ATOL)
        assert lps[1] == pytest.approx(second, abs=ATOL)
        assert lps[0] > float(lp[cont[0]])  # renormalising raises it
    # The benchmark's fair mode: first-token log-lik renormalised without `<think>` alone.
    metrics, results = run_benchmark(em, recs, BenchmarkOptions(ban_think=True,
                                                                max_new_tokens=3))
    for r, lp, rec in zip(results, raw, recs, strict=True):
        first = TOK.encode(rec["answer"])[0]
        want = float(lp[first] - torch.log1p(-lp[TOK.think_start].exp()))
        assert r["first_token_logprob"] == pytest.approx(want, abs=ATOL)
        assert not r["outputs"][0].startswith("<think>")
    plain, _ = run_benchmark(em, recs, BenchmarkOptions(max_new_tokens=3))
    assert metrics["first_token_logprob"] >= plain["first_token_logprob"]
    with pytest.raises(ValueError, match="ban_think"):
        BenchmarkOptions(think=True, ban_think=True).validate()


def test_benchmark_thinks_in_the_runs_thought_template(em, monkeypatch):
    """With `rlp.thought_template`, the evaluation samples thoughts as the run trained them:
    instruction + prompt + forced tokens + `<think>`; the answer is scored after that."""
    from megatron_rlp.rollout.template import build_template

    monkeypatch.setattr(em.cfg.rlp, "thought_template", "Note: {context} Think:")
    template = build_template(em.cfg.rlp.thought_template, TOK)
    assert template.before and len(template.lead) > 1
    recs = records(2)
    _, results = run_benchmark(em, recs, BenchmarkOptions(think=True, samples=2,
                                                          max_new_tokens=4))
    prompt = TOK.encode(BenchmarkOptions().prompt_template.format(question=recs[0]["question"]))
    per = []
    for ids in results[0]["thought_ids"]:
        closing = [] if ids and ids[-1] == TOK.think_end else [TOK.think_end]
        context = list(template.before) + prompt + list(template.lead) + ids + closing
        per.append(direct_continuation(em.policy, context, TOK.encode(recs[0]["answer"]))[0])
    assert results[0]["answer_logprob"] == pytest.approx(sum(per) / 2, abs=1e-3)


# --------------------------------------------------------------------------------------
# lm-eval adapter

# lm-eval is the `eval` extra (in `dev`): without it these tests skip, the others still run.


def instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def lm(em):
    pytest.importorskip("lm_eval")
    from megatron_rlp.eval.lm_eval_adapter import MegatronRLPLM

    return MegatronRLPLM(eval_model=em, batch_size=2)


def test_adapter_loglikelihood_equals_a_direct_forward(lm, em):
    pairs = [("Question: What is 1 + 2?\nAnswer:", " 3"), ("", "hello"), ("abc ", "def"),
             ("x", "yz!")]
    got = lm.loglikelihood(instances("loglikelihood", pairs))
    for (ctx, cont), (lp, greedy) in zip(pairs, got, strict=True):
        n_sp = len(ctx) - len(ctx.rstrip())  # lm-eval moves trailing spaces to the continuation
        c_ids = TOK.encode(ctx.rstrip()) or [TOK.eos]  # empty context: end-of-document first
        want, want_greedy = direct_continuation(em.policy, c_ids, TOK.encode(ctx[len(ctx) - n_sp:]
                                                                             + cont))
        assert lp == pytest.approx(want, abs=1e-3) and greedy is want_greedy
    text = "The quick brown fox."
    (rolling,) = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    assert rolling == pytest.approx(direct_continuation(em.policy, [TOK.eos], TOK.encode(text))[0],
                                    abs=1e-3)


def test_adapter_generate_until_stops(lm, em):
    ctx = "Question: What is 1 + 2?\nAnswer:"
    free = generate(em.policy, [TOK.encode(ctx)], max_new_tokens=12, max_sequence_length=WINDOW,
                    vocab_size=VOCAB, pad=TOK.pad)[0]
    text = TOK.decode(free)
    stop = text[4:6]
    gens = lm.generate_until(instances("generate_until", [
        (ctx, {"until": [stop], "max_gen_toks": 12}),
        (ctx, {"until": ["@@never@@"], "max_gen_toks": 12}),
        (ctx, {"until": stop, "max_gen_toks": 3}),
    ]))
    assert gens[0] == text[:text.index(stop)] and stop not in gens[0]
    assert gens[1] == text
    assert gens[2] == truncate(TOK.decode(free[:3]), stop)


def truncate(text: str, stop: str) -> str:
    return text.split(stop)[0]


def test_adapter_thinking_inserts_a_sampled_thought(lm, em):
    from megatron_rlp.eval.lm_eval_adapter import MegatronRLPLM

    thinker = MegatronRLPLM(eval_model=em, think=True)
    text = "Question: What is 1 + 2?\nAnswer:"
    ctx = TOK.encode(text)
    (with_thought,) = thinker._with_thoughts([ctx], [TOK.encode(" 3")[0]])
    assert with_thought[:len(ctx) + 1] == ctx + [TOK.think_start]
    assert with_thought[-1] == TOK.think_end and len(with_thought) <= len(ctx) + 2 + 6
    # the thought is keyed by the context: the same for every continuation, in any batch
    (lp, _), (lp2, _) = thinker.loglikelihood(instances("loglikelihood", [
        ("x", " y"), (text, " 3")]))[1:] + thinker.loglikelihood(instances("loglikelihood", [
            (text, " 4")]))
    want = direct_continuation(em.policy, with_thought, TOK.encode(" 3"))[0]
    assert lp == pytest.approx(want, abs=1e-3)
    want2 = direct_continuation(em.policy, with_thought, TOK.encode(" 4"))[0]
    assert lp2 == pytest.approx(want2, abs=1e-3)
    (gen,) = thinker.generate_until(instances("generate_until", [(text, {"until": ["\n"],
                                                                        "max_gen_toks": 4})]))
    ids = generate(em.policy, [with_thought], max_new_tokens=4, max_sequence_length=WINDOW,
                   vocab_size=VOCAB, pad=TOK.pad, stop_ids=[TOK.eos])[0]
    assert gen == truncate(TOK.decode(ids[:-1] if ids[-1:] == [TOK.eos] else ids), "\n")


def test_lm_eval_runs_local_task_files(lm, tmp_path, monkeypatch):
    """lm-eval's own evaluator on the YAMLs tools/make_tasks.py writes: no download."""
    import json

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from megatron_rlp.eval.lm_eval_tasks import write_lm_eval_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(4)))
    write_lm_eval_tasks(tmp_path / "tasks", data)
    out = simple_evaluate(model=lm, tasks=["rlp_heldout_gen", "rlp_heldout_ll"],
                          task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                   include_defaults=False),
                          limit=4, bootstrap_iters=0, log_samples=False,
                          cache_requests=False, random_seed=0)
    gen, ll = out["results"]["rlp_heldout_gen"], out["results"]["rlp_heldout_ll"]
    assert 0 <= gen["exact_match,first-number"] <= 1 and 0 <= ll["acc,none"] <= 1
    # perplexity aggregates exp(-mean log-lik) of " <answer>" after the prompt
    lls = [lm.loglikelihood(instances("loglikelihood", [(
        f"Question: {r['question']}\nAnswer:", f" {r['answer']}")]))[0][0] for r in records(4)]
    assert ll["perplexity,none"] == pytest.approx(torch.tensor(lls).mean().neg().exp().item(),
                                                  rel=1e-4)
