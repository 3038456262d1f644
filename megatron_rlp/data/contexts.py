"""Drawing what each training step works on: RLP contexts and plain next-token windows.

An RLP context is a document prefix x_<t and its true next token x_t. Draws depend only on
(seed, step) — and, for the `entropy` strategy, on the teacher that scores them — never on
what was drawn before, so a resumed run or any rank recomputes exactly the same batch.
Contexts come grouped by document: one forward over a document yields the prefix state for
all of its positions.

Documents come from any *document source*: an object with `documents` (random access,
`documents[i]` -> int32 tokens), `lengths` (int64 per document), `eos` and `path` — a
`TokenizedCorpus` (JSONL/.txt) or an `IndexedCorpus` (Megatron indexed datasets, blends).

Positions inside a document (`rlp.position_strategy`):
    uniform   positions drawn uniformly without replacement
    stride    `positions_per_doc` positions `stride` tokens apart, at a random offset
    entropy   the positions where the teacher's next-token distribution has the highest
              entropy (a `PositionScorer` does the forward; ties go to the earlier position)
Corpora that carry worked thoughts (`<think> ... </think>`, like the shipped one) are text
the model reads, not text it is asked to predict: with `skip_spans` a target x_t is never a
thought marker or inside such a span, so every prefix ends outside any thought.

Prefixes (issue 11): every context conditions on its full prefix. A document's positions
t_1 < ... < t_k share one window doc[ws : t_k] with ws = max(0, t_1 - max_prefix), and context
t reads doc[ws : t] -- the rule's prefix doc[max(0, t - max_prefix) : t] or a longer one, never
a shorter one: at least min(t, max_prefix) tokens, and later positions of the document read a
little more text so that one causal forward over the window serves them all (rollout prefill,
teacher, packed update). `batches.build_rlp_inputs` applies the same rule. The window is at
most `max_window_tokens(...)` long: positions lie in a random band of `band` candidates
(`rlp.position_band_tokens`, at most and by default max_prefix - min_prefix + 1; all
positions of a short document), so a window holds at most max_prefix + band - 1 tokens with several
positions per document (2 max_prefix - min_prefix by default), and max_prefix with one,
where the position is uniform over the whole document (the default). Every t >= min_prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from megatron_rlp.config.rlp import band_width, max_window_tokens  # noqa: F401 (a config rule)

STRATEGIES = ("uniform", "stride", "entropy")

PositionScorer = Callable[[list[np.ndarray]], list[np.ndarray]]
"""Scores token windows: for each window w (int32 tokens) an array h of len(w) floats, h[j] the
entropy of the next-token distribution after w[:j+1] (the one predicting w[j+1])."""


class DocumentSource(Protocol):
    """What the samplers read: see the module docstring."""

    path: object
    documents: Sequence[np.ndarray]
    lengths: np.ndarray
    eos: int


@dataclass(frozen=True, eq=False)
class Context:
    """One RLP context.

    Attributes:
        doc_index: Index of the document in the corpus.
        position: Index t of the target token in the document.
        prefix: The tokens the context is conditioned on: doc[ws:t], ws = max(0, t_1 -
            max_prefix) with t_1 the first position of its document (int32; at least
            min(t, max_prefix) >= min_prefix tokens, at most `max_window_tokens(...)`).
        target: tokens[t], the true next token.
    """

    doc_index: int
    position: int
    prefix: np.ndarray
    target: int


def _band(length: int, k_span: int, min_prefix: int, max_prefix: int, width: int,
          rng: np.random.Generator) -> tuple[int, int]:
    """Candidate positions [lo, hi] of one document: all of them when the document fits one
    window, else a random band of `width` (<= max_prefix - min_prefix + 1) positions. Either
    way windows stay within `max_window_tokens`."""
    if length - 1 <= max_prefix:
        return min_prefix, length - 1
    assert width >= k_span
    lo = int(rng.integers(min_prefix, length - width + 1))
    return lo, lo + width - 1


def top_entropy_positions(entropy: np.ndarray, lo: int, hi: int, window_start: int,
                          k: int, valid: np.ndarray | None = None) -> np.ndarray:
    """The k positions t in [lo, hi] with the highest entropy, sorted (ties: earlier first).

    Args:
        entropy: Scores of the window doc[window_start:hi]: entropy[j] belongs to position
            window_start + j + 1.
        valid: Optional bool per document position; only valid positions are chosen.
    """
    positions = np.arange(lo, hi + 1)
    if valid is not None:
        positions = positions[valid[positions]]
    scores = np.asarray(entropy, dtype=np.float64)[positions - window_start - 1]
    order = np.argsort(-scores, kind="stable")[:k]
    return np.sort(positions[order])


class ContextSampler:
    """Draws RLP contexts, deterministically in (seed, step).

    Args:
        corpus: A document source (`TokenizedCorpus`, `IndexedCorpus`).
        min_prefix: Smallest prefix a context gets (at least 1).
        max_prefix: Longest prefix, the max context length (at least `min_prefix`).
        seed: Seed shared by all steps.
        strategy: "uniform", "stride" or "entropy" (see the module docstring).
        stride: Token distance between positions of one document for "stride".
        band: Candidate positions one document's positions are drawn from when it has more
            (bounds the window, see `max_window_tokens`); 0 or more than max_prefix -
            min_prefix + 1 = that many.
        scorer: Required for "entropy": scores token windows (see `PositionScorer`).
        skip_spans: (begin, end) thought-marker ids: targets never fall on a marker or inside
            a span (None = any position).

    Raises:
        ValueError: Bad prefix bounds or strategy, or no document is longer than `min_prefix`.
    """

    def __init__(
        self, corpus: DocumentSource, min_prefix: int, max_prefix: int, seed: int, *,
        strategy: str = "uniform", stride: int = 1, scorer: PositionScorer | None = None,
        skip_spans: tuple[int, int] | None = None, band: int = 0,
    ) -> None:
        if not 1 <= min_prefix <= max_prefix:
            raise ValueError(
                f"need 1 <= min_prefix <= max_prefix, got min_prefix={min_prefix}, "
                f"max_prefix={max_prefix}"
            )
        if strategy not in STRATEGIES:
            raise ValueError(f"position strategy {strategy!r} is not one of {STRATEGIES}")
        if strategy == "entropy" and scorer is None:
            raise ValueError("the entropy position strategy needs a scorer")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if band < 0:
            raise ValueError(f"band must be >= 0 (0 = max_prefix - min_prefix + 1), got {band}")
        self.corpus = corpus
        self.min_prefix = min_prefix
        self.max_prefix = max_prefix
        self.seed = seed
        self.strategy = strategy
        self.stride = stride
        self.band = band_width(min_prefix, max_prefix, band)
        self.scorer = scorer
        self.skip_spans = skip_spans
        if not np.any(np.asarray(corpus.lengths) > min_prefix):
            raise ValueError(
                f"{corpus.path}: no document has more than min_prefix={min_prefix} tokens"
            )

    def _targets(self, tokens: np.ndarray) -> np.ndarray | None:
        """Bool per position: may x_t be a target (see `skip_spans`)? None = every position."""
        if self.skip_spans is None:
            return None
        tokens = np.asarray(tokens)
        begin, end = (tokens == self.skip_spans[0]), (tokens == self.skip_spans[1])
        if not (begin.any() or end.any()):
            return None
        depth = np.cumsum(begin.astype(np.int64) - end.astype(np.int64))  # after each token
        inside = np.concatenate([[0], depth[:-1]]) > 0  # open span before the token
        return ~(begin | end | inside)

    def _positions(self, tokens: np.ndarray, span: int, k: int, rng: np.random.Generator):
        """This document's positions for `k` contexts (for "entropy": the band and the valid
        mask, scored later), or None when too few valid targets are left."""
        valid = self._targets(tokens)
        if self.strategy == "uniform" and k == 1:
            # One position: uniform over the whole document (no band needed).
            cands = np.arange(self.min_prefix, len(tokens))
            cands = cands if valid is None else cands[valid[cands]]
            return cands[rng.choice(len(cands), 1, replace=False)] if len(cands) else None
        lo, hi = _band(len(tokens), span, self.min_prefix, self.max_prefix, self.band, rng)
        cands = np.arange(lo, hi + 1)
        if self.strategy == "stride":
            starts = cands[:len(cands) - (span - 1)]
            if valid is not None:
                starts = starts[valid[starts[:, None] + self.stride * np.arange(k)].all(1)]
            if not len(starts):
                return None
            return starts[int(rng.integers(0, len(starts)))] + self.stride * np.arange(k)
        if valid is not None:
            cands = cands[valid[cands]]
        if len(cands) < k:
            return None
        if self.strategy == "uniform":
            return cands[np.sort(rng.choice(len(cands), k, replace=False))]
        return (lo, hi, valid)  # entropy: scored below, all documents in one call

    def _span(self, positions_per_doc: int) -> int:
        """Candidate positions a document needs for `positions_per_doc` contexts."""
        if self.strategy == "stride":
            return (positions_per_doc - 1) * self.stride + 1
        return positions_per_doc

    def sample(self, step: int, num_contexts: int, positions_per_doc: int = 1) -> list[Context]:
        """Draws the contexts of one step.

        Documents are drawn uniformly without replacement among those with enough candidate
        positions t in [min_prefix, len - 1]; each gets `positions_per_doc` distinct positions
        chosen by the strategy.

        Args:
            step: Training step; with the seed, it alone fixes the draw.
            num_contexts: Number of contexts, a multiple of `positions_per_doc`.
            positions_per_doc: Contexts per drawn document.

        Returns:
            `num_contexts` contexts; those of one document are consecutive and sorted by
            position.

        Raises:
            ValueError: `num_contexts` is not a positive multiple of `positions_per_doc`, the
                positions do not fit one window, or the corpus has too few documents with
                enough positions.
        """
        if positions_per_doc < 1 or num_contexts < 1 or num_contexts % positions_per_doc:
            raise ValueError(
                f"num_contexts={num_contexts} must be a positive multiple of "
                f"positions_per_doc={positions_per_doc}"
            )
        span = self._span(positions_per_doc)
        if span > self.band:
            raise ValueError(
                f"{positions_per_doc} positions ({self.strategy}, stride {self.stride}) do not "
                f"fit one window of max_prefix={self.max_prefix} with min_prefix="
                f"{self.min_prefix} (a band of {self.band} candidate positions)"
            )
        num_docs = num_contexts // positions_per_doc
        lengths = np.asarray(self.corpus.lengths)
        eligible = np.flatnonzero(lengths - self.min_prefix >= span)
        if len(eligible) < num_docs:
            raise ValueError(
                f"{self.corpus.path}: {num_docs} documents with at least "
                f"{self.min_prefix + span} tokens are needed, only {len(eligible)} exist"
            )
        rng = np.random.default_rng([self.seed, step])
        picks: list[tuple[int, np.ndarray, np.ndarray | tuple]] = []
        drawn = [int(d) for d in rng.choice(eligible, size=num_docs, replace=False)]
        used, tries = set(drawn), 0
        for doc_index in drawn:
            while True:
                tokens = self.corpus.documents[doc_index]
                chosen = self._positions(tokens, span, positions_per_doc, rng)
                if chosen is not None:
                    break
                # Too few targets outside thought spans: another document (deterministic).
                tries += 1
                if len(used) == len(eligible) or tries > 100 * num_docs:
                    raise ValueError(f"{self.corpus.path}: too few documents with {span} "
                                     f"positions outside thought spans")
                while (doc_index := int(eligible[rng.integers(len(eligible))])) in used:
                    pass
                used.add(doc_index)
            picks.append((doc_index, tokens, chosen))

        if self.strategy == "entropy":
            starts = [lo - self.min_prefix for _, _, (lo, _, _) in picks]
            windows = [tokens[ws:hi] for (_, tokens, (_, hi, _)), ws in zip(picks, starts,
                                                                             strict=True)]
            scores = self.scorer(windows)
            picks = [(d, tokens, top_entropy_positions(h, lo, hi, ws, positions_per_doc, valid))
                     for (d, tokens, (lo, hi, valid)), ws, h in zip(picks, starts, scores,
                                                                     strict=True)]

        contexts = []
        for doc_index, tokens, positions in picks:
            # The document's shared window: the first position keeps its full prefix, so
            # no later one has a shorter one (module docstring).
            ws = max(0, int(positions[0]) - self.max_prefix)
            for t in positions:
                t = int(t)
                contexts.append(Context(doc_index=doc_index, position=t, prefix=tokens[ws:t],
                                        target=int(tokens[t])))
        return contexts


class NTPBatcher:
    """Draws next-token-prediction windows of `seq_length + 1` tokens.

    A `TokenizedCorpus` is joined into one stream with the eos id after each document, and
    windows start at random offsets keyed by (seed, step). An `IndexedCorpus` uses Megatron's
    `GPTDataset` over the same blend and split (its own shuffled sample order); step s reads
    samples [s * batch_size, (s + 1) * batch_size), wrapping around after the last one.

    Args:
        corpus: A document source.
        seq_length: Tokens per training sequence.
        seed: Seed shared by all steps.

    Raises:
        ValueError: The corpus has fewer than seq_length + 1 tokens with separators.
    """

    def __init__(self, corpus, seq_length: int, seed: int) -> None:
        self.seq_length = seq_length
        self.seed = seed
        self.windows = None
        self.stream = None
        if hasattr(corpus, "gpt_windows"):
            if seq_length < 1:
                raise ValueError(f"seq_length={seq_length} must be >= 1")
            self.windows = corpus.gpt_windows(seq_length, seed)
            return
        eos = np.array([corpus.eos], dtype=np.int32)
        self.stream = np.concatenate([part for doc in corpus.documents for part in (doc, eos)])
        if seq_length < 1 or len(self.stream) < seq_length + 1:
            raise ValueError(
                f"{corpus.path}: seq_length={seq_length} needs at least {seq_length + 1} "
                f"tokens, the corpus has {len(self.stream)}"
            )

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        """Draws the windows of one step, deterministically in (seed, step).

        Args:
            step: Training step; with the seed, it alone fixes the draw.
            batch_size: Number of windows.

        Returns:
            int64 array [batch_size, seq_length + 1] of token ids.
        """
        if self.windows is not None:
            index = (step * batch_size + np.arange(batch_size)) % len(self.windows)
            rows = []
            for i in index:
                sample = self.windows[int(i)]
                rows.append(np.append(sample["tokens"].numpy(), sample["labels"][-1].item()))
            return np.stack(rows).astype(np.int64)
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.stream) - self.seq_length, size=batch_size)
        index = starts[:, None] + np.arange(self.seq_length + 1)
        return self.stream[index].astype(np.int64)


def build_context_sampler(rlp_cfg, corpus: DocumentSource, seed: int,
                          scorer: PositionScorer | None = None,
                          thought_markers: tuple[int, int] | None = None) -> ContextSampler:
    """The sampler an `RLPConfig` describes (`min/max_prefix_tokens`, `position_*`,
    `skip_thought_spans` with the tokenizer's `thought_markers`)."""
    return ContextSampler(corpus, min_prefix=rlp_cfg.min_prefix_tokens,
                          max_prefix=rlp_cfg.max_prefix_tokens, seed=seed,
                          strategy=rlp_cfg.position_strategy, stride=rlp_cfg.position_stride,
                          scorer=scorer, band=rlp_cfg.position_band_tokens,
                          skip_spans=thought_markers if rlp_cfg.skip_thought_spans else None)
