"""Held-out contexts at the answers of a task corpus: `train.eval_position_strategy=answer`.

A task corpus (`tools/make_tasks.py`, eval/tasks.py) records, per document, where each
item's answer starts (`answer_offsets`, kept by `data.corpus.load_corpus` as token
positions). The answer's first token is where thinking should pay (a multi-digit sum's first
digit depends on every carry), so evaluating there measures what RLP is for, while uniform
positions mostly land on predictable template text.

Answers right after a `</think>` in the corpus (items that carry their worked thought) are
left out: there the no-thought baseline would read the working. Written here rather than as
a `ContextSampler` strategy because the positions come from the corpus, not from the tokens
or a scorer; the draw is deterministic in (seed, step) as the sampler's is.
"""

from __future__ import annotations

import numpy as np

from megatron_rlp.data.contexts import Context


class AnswerPositionSampler:
    """Contexts at answer positions, one per document.

    Args:
        corpus: a `TokenizedCorpus` with `answer_positions`.
        min_prefix, max_prefix: prefix bounds, as for `ContextSampler`.
        seed: fixes the draw with the step.
        think_end: the `</think>` id (answers right after it are skipped), or None.

    Raises:
        ValueError: the corpus has no answer positions with at least `min_prefix` tokens
            before them.
    """

    strategy = "answer"

    def __init__(self, corpus, min_prefix: int, max_prefix: int, seed: int,
                 think_end: int | None = None) -> None:
        answers = getattr(corpus, "answer_positions", None)
        self.corpus, self.min_prefix, self.max_prefix, self.seed = (corpus, min_prefix,
                                                                    max_prefix, seed)
        self.candidates: list[tuple[int, np.ndarray]] = []
        for d, positions in enumerate(answers or []):
            doc = corpus.documents[d]
            keep = [int(t) for t in positions if min_prefix <= t < len(doc)
                    and (think_end is None or int(doc[t - 1]) != think_end)]
            if keep:
                self.candidates.append((d, np.array(keep, dtype=np.int64)))
        if not self.candidates:
            raise ValueError(f"{corpus.path}: no answer positions (a JSONL corpus with "
                             f"answer_offsets, e.g. from tools/make_tasks.py, with at least "
                             f"min_prefix={min_prefix} tokens before an answer)")

    def sample(self, step: int, num_contexts: int, positions_per_doc: int = 1) -> list[Context]:
        """`num_contexts` contexts, each at an answer of a different document (drawn
        uniformly without replacement; with fewer documents, they are reused in order)."""
        if positions_per_doc != 1:
            raise ValueError("answer positions are drawn one per document")
        rng = np.random.default_rng([self.seed, step, 0x5A])
        order = rng.permutation(len(self.candidates))
        out = []
        for i in range(num_contexts):
            d, positions = self.candidates[int(order[i % len(order)])]
            t = int(positions[rng.integers(0, len(positions))])
            doc = self.corpus.documents[d]
            out.append(Context(d, t, doc[max(0, t - self.max_prefix):t], int(doc[t])))
        return out
