"""The yardstick of tools/bench_rlp.py: a straightforward Hugging Face transformers RLP step.

What a user would write without this project, at the same sizes: a `Qwen3ForCausalLM` with the
Megatron model's dimensions (attention layers of the `*-` pattern, hidden, FFN, heads, query
groups, RoPE base, tied embeddings), an fp32 deep-copy EMA teacher, and per step

    rollout  `generate` per (context, thought) row (prompt `prefix <think>`, sampling at the
             RLP temperature/top-p, stop at `</think>`), then one scoring forward per row over
             `prefix <think> thought </think>` for S_pred; `batched=True` (bench --hf-batched):
             one `generate` over all rows, left-padded, and one batched scoring forward
    scoring  one teacher forward per context for S_ema
    update   one right-padded batch forward/backward over `prefix <think> thought` rows, the
             project's clipped surrogate (megatron_rlp.objective), grad clipping, AdamW, EMA

The math is RLP.md's, as in `train.rlp_step`; the draws differ (HF's own sampler), so only
times and token counts are compared, never thoughts.
"""

from __future__ import annotations

import copy
import time

import torch

from megatron_rlp.objective import clipped_surrogate_loss, group_advantages, info_gain_reward


def hf_model(cfg, vocab_size: int, seed: int):
    """A transformers Qwen3 causal LM shaped like `cfg.model` (randomly initialised), in
    `precision.params_dtype` (bf16 or fp32), as the Megatron paths run."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_rlp.models.vocab import padded_vocab_size

    m = cfg.model
    if set(m.hybrid_layer_pattern) - set("*-"):
        raise ValueError("the transformers yardstick covers dense (`*-`) patterns only")
    hcfg = Qwen3Config(
        vocab_size=padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by),
        hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.hybrid_layer_pattern.count("*"),
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
        head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
        max_position_embeddings=m.max_sequence_length,
        tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        rms_norm_eps=m.norm_epsilon, attn_implementation="sdpa")
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if cfg.precision.params_dtype == "bf16" else torch.float32
    return Qwen3ForCausalLM(hcfg).to(dtype)


def _logprob(logits: torch.Tensor, target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.log_softmax(logits[..., :vocab_size].float(), -1).gather(
        -1, target[..., None])[..., 0]


class HFRLPStep:
    """One RLP step with transformers, on the contexts `tools/bench_rlp.py` also gives the
    Megatron paths (`PromptBatch`)."""

    def __init__(self, cfg, tokenizer, batched: bool = False):
        self.cfg, self.tok, self.batched = cfg, tokenizer, batched
        self.policy = hf_model(cfg, tokenizer.vocab_size, cfg.train.seed)
        self.teacher = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.padded_ids = list(range(tokenizer.vocab_size, self.policy.config.vocab_size))
        self.decode_seconds, self.decode_steps = 0.0, 0  # `generate` calls (bench_rlp reads)
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=o.lr,
                                           betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                           weight_decay=o.weight_decay)

    def _rollout_batched(self, prompts, seed: int):
        """One `generate` over all B*G rows (left-padded), one scoring forward for S_pred."""
        r, tok, v = self.cfg.rlp, self.tok, self.tok.vocab_size
        torch.manual_seed(seed)
        ids = torch.cat([prompts.tokens, torch.full((len(prompts.tokens), 1), tok.think_start)],
                        1).repeat_interleave(r.group_size, 0)
        attn = torch.cat([prompts.valid, torch.ones(len(prompts.valid), 1, dtype=torch.bool)],
                         1).repeat_interleave(r.group_size, 0).long()
        start = time.perf_counter()
        out = self.policy.generate(
            ids, attention_mask=attn, do_sample=True, temperature=r.temperature, top_p=r.top_p,
            top_k=0, max_new_tokens=r.max_thought_tokens, eos_token_id=tok.think_end,
            pad_token_id=tok.pad, output_scores=True, return_dict_in_generate=True,
            suppress_tokens=self.padded_ids)
        # `generate`'s time per decoded position (its prefill included: one forward of many)
        self.decode_seconds += time.perf_counter() - start
        self.decode_steps += len(out.scores)
        new = out.sequences[:, ids.shape[1]:]
        scores = torch.log_softmax(torch.stack(out.scores, 1), -1)  # [R, n, V]
        rows, full = [], []
        for i in range(len(ids)):
            ends = (new[i] == tok.think_end).nonzero()
            n = int(ends[0]) + 1 if len(ends) else new.shape[1]
            thought = new[i, :n]
            lp = scores[i, torch.arange(n)].gather(-1, thought[:, None])[:, 0]
            prefix = ids[i, attn[i].bool()]
            rows.append((prefix, thought, lp))
            closed = bool(thought[-1] == tok.think_end)
            full.append(torch.cat([prefix, thought] + ([] if closed else [
                torch.tensor([tok.think_end])])))
        width = max(len(f) for f in full)  # left-padded scoring batch: last column predicts
        batch = torch.full((len(full), width), tok.pad, dtype=torch.long)
        mask = torch.zeros(len(full), width, dtype=torch.long)
        for i, f in enumerate(full):
            batch[i, width - len(f):], mask[i, width - len(f):] = f, 1
        logits = self.policy(batch, attention_mask=mask).logits[:, -1]
        targets = prompts.targets.repeat_interleave(r.group_size)
        return rows, list(_logprob(logits, targets, v))

    def step(self, prompts, timer, seed: int) -> dict[str, float]:
        r, tok, v = self.cfg.rlp, self.tok, self.tok.vocab_size
        g = r.group_size
        rows = []  # (prompt ids, thought ids, sampling log-probs)
        s_pred = []
        with timer("rollout"), torch.no_grad():
            self.policy.eval()
            torch.manual_seed(seed)
            if self.batched:
                rows, s_pred = self._rollout_batched(prompts, seed)
            for b in range(0 if self.batched else len(prompts.lengths)):
                prefix = prompts.tokens[b, -int(prompts.lengths[b]):]
                ids = torch.cat([prefix, torch.tensor([tok.think_start])])[None]
                for _ in range(g):
                    start = time.perf_counter()
                    out = self.policy.generate(
                        ids, attention_mask=torch.ones_like(ids), do_sample=True,
                        temperature=r.temperature, top_p=r.top_p, top_k=0,
                        max_new_tokens=r.max_thought_tokens, eos_token_id=tok.think_end,
                        pad_token_id=tok.pad, output_scores=True, return_dict_in_generate=True,
                        suppress_tokens=self.padded_ids)  # never sample padded-vocabulary ids
                    self.decode_seconds += time.perf_counter() - start
                    self.decode_steps += len(out.scores)
                    thought = out.sequences[0, ids.shape[1]:]
                    scores = torch.stack(out.scores, 1)[0]  # [n, V] processed (temperature)
                    lp = torch.log_softmax(scores, -1).gather(-1, thought[:, None])[:, 0]
                    rows.append((ids[0], thought, lp))
                    closed = bool(thought[-1] == tok.think_end)
                    full = torch.cat([ids[0], thought] + ([] if closed else [
                        torch.tensor([tok.think_end])]))
                    logits = self.policy(full[None]).logits[0, -1]  # S_pred scoring forward
                    s_pred.append(_logprob(logits, prompts.targets[b], v))
        with timer("scoring"), torch.no_grad():
            s_ema = []
            for b in range(len(prompts.lengths)):
                prefix = prompts.tokens[b, -int(prompts.lengths[b]):]
                logits = self.teacher(prefix[None]).logits[0, -1]
                s_ema.append(_logprob(logits, prompts.targets[b], v))
            rewards = info_gain_reward(torch.stack(s_pred),
                                       torch.stack(s_ema).repeat_interleave(g))
            advantages = group_advantages(rewards.view(-1, g)).view(-1)
        with timer("update"):
            self.policy.train()
            width = max(len(p) + len(t) for p, t, _ in rows)
            n = max(len(t) for _, t, _ in rows)
            ids = torch.full((len(rows), width), tok.pad, dtype=torch.long)
            attn = torch.zeros(len(rows), width, dtype=torch.long)
            index = torch.zeros(len(rows), n, dtype=torch.long)
            labels = torch.zeros(len(rows), n, dtype=torch.long)
            mask = torch.zeros(len(rows), n, dtype=torch.bool)
            logp_old = torch.zeros(len(rows), n)
            for i, (p, t, lp) in enumerate(rows):
                ids[i, :len(p) + len(t)] = torch.cat([p, t])
                attn[i, :len(p) + len(t)] = 1
                index[i, :len(t)] = len(p) - 1 + torch.arange(len(t))
                labels[i, :len(t)], mask[i, :len(t)], logp_old[i, :len(t)] = t, True, lp
            self.optimizer.zero_grad()
            logits = self.policy(ids, attention_mask=attn).logits
            picked = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
            logp_new = _logprob(picked / r.temperature, labels, v)
            loss = clipped_surrogate_loss(logp_new, logp_old, advantages, mask,
                                          r.clip_eps_low, r.clip_eps_high)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.optimizer.clip_grad)
            self.optimizer.step()
            with torch.no_grad():
                for a, b in zip(self.teacher.parameters(), self.policy.parameters(), strict=True):
                    a.mul_(r.ema_decay).add_(b, alpha=1 - r.ema_decay)
        return {"loss": float(loss.detach()), "thought_len": sum(len(t) for _, t, _ in rows)
                / len(rows), "tokens": float(sum(len(p) + len(t) for p, t, _ in rows))}
