"""Drawing what each training step works on: RLP contexts and plain next-token windows.

An RLP context is a document prefix x_<t and its true next token x_t. Draws depend only on
(seed, step), never on what was drawn before, so a resumed run or any rank recomputes exactly
the same batch. Contexts come grouped by document: one forward over a document yields the
prefix state for all of its positions.
"""

from dataclasses import dataclass

import numpy as np

from megatron_rlp.data.corpus import TokenizedCorpus


@dataclass(frozen=True, eq=False)
class Context:
    """One RLP context.

    Attributes:
        doc_index: Index of the document in the corpus.
        position: Index t of the target token in the document.
        prefix: tokens[max(0, t - max_prefix):t] of the document (int32).
        target: tokens[t], the true next token.
    """

    doc_index: int
    position: int
    prefix: np.ndarray
    target: int


class ContextSampler:
    """Draws RLP contexts, deterministically in (seed, step).

    Args:
        corpus: The tokenized corpus.
        min_prefix: Smallest target position t, hence the shortest prefix (at least 1).
        max_prefix: Longest prefix; earlier tokens are cut off (at least `min_prefix`).
        seed: Seed shared by all steps.

    Raises:
        ValueError: Bad prefix bounds, or no document is longer than `min_prefix` tokens.
    """

    def __init__(
        self, corpus: TokenizedCorpus, min_prefix: int, max_prefix: int, seed: int
    ) -> None:
        if not 1 <= min_prefix <= max_prefix:
            raise ValueError(
                f"need 1 <= min_prefix <= max_prefix, got min_prefix={min_prefix}, "
                f"max_prefix={max_prefix}"
            )
        self.corpus = corpus
        self.min_prefix = min_prefix
        self.max_prefix = max_prefix
        self.seed = seed
        if not np.any(corpus.lengths > min_prefix):
            raise ValueError(
                f"{corpus.path}: no document has more than min_prefix={min_prefix} tokens"
            )

    def sample(self, step: int, num_contexts: int, positions_per_doc: int = 1) -> list[Context]:
        """Draws the contexts of one step.

        Documents are drawn uniformly without replacement among those with at least
        `positions_per_doc` candidate positions t in [min_prefix, len - 1]; each gets
        `positions_per_doc` distinct positions.

        Args:
            step: Training step; with the seed, it alone fixes the draw.
            num_contexts: Number of contexts, a multiple of `positions_per_doc`.
            positions_per_doc: Contexts per drawn document.

        Returns:
            `num_contexts` contexts; those of one document are consecutive and sorted by
            position.

        Raises:
            ValueError: `num_contexts` is not a positive multiple of `positions_per_doc`, or
                the corpus has too few documents with enough positions.
        """
        if positions_per_doc < 1 or num_contexts < 1 or num_contexts % positions_per_doc:
            raise ValueError(
                f"num_contexts={num_contexts} must be a positive multiple of "
                f"positions_per_doc={positions_per_doc}"
            )
        num_docs = num_contexts // positions_per_doc
        lengths = self.corpus.lengths
        eligible = np.flatnonzero(lengths - self.min_prefix >= positions_per_doc)
        if len(eligible) < num_docs:
            raise ValueError(
                f"{self.corpus.path}: {num_docs} documents with at least "
                f"{self.min_prefix + positions_per_doc} tokens are needed, only "
                f"{len(eligible)} exist"
            )
        rng = np.random.default_rng([self.seed, step])
        contexts = []
        for doc_index in rng.choice(eligible, size=num_docs, replace=False):
            tokens = self.corpus.documents[doc_index]
            offsets = rng.choice(len(tokens) - self.min_prefix, positions_per_doc, replace=False)
            for t in np.sort(offsets) + self.min_prefix:
                contexts.append(Context(
                    doc_index=int(doc_index),
                    position=int(t),
                    prefix=tokens[max(0, t - self.max_prefix):t],
                    target=int(tokens[t]),
                ))
        return contexts


class NTPBatcher:
    """Draws next-token-prediction windows from the concatenated corpus.

    The documents are joined into one stream with the eos id after each document; a window
    of seq_length + 1 tokens gives inputs window[:-1] and labels window[1:].

    Args:
        corpus: The tokenized corpus.
        seq_length: Tokens per training sequence.
        seed: Seed shared by all steps.

    Raises:
        ValueError: The corpus has fewer than seq_length + 1 tokens with separators.
    """

    def __init__(self, corpus: TokenizedCorpus, seq_length: int, seed: int) -> None:
        eos = np.array([corpus.eos], dtype=np.int32)
        self.stream = np.concatenate([part for doc in corpus.documents for part in (doc, eos)])
        if seq_length < 1 or len(self.stream) < seq_length + 1:
            raise ValueError(
                f"{corpus.path}: seq_length={seq_length} needs at least {seq_length + 1} "
                f"tokens, the corpus has {len(self.stream)}"
            )
        self.seq_length = seq_length
        self.seed = seed

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        """Draws the windows of one step, deterministically in (seed, step).

        Args:
            step: Training step; with the seed, it alone fixes the draw.
            batch_size: Number of windows.

        Returns:
            int64 array [batch_size, seq_length + 1] of token ids.
        """
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.stream) - self.seq_length, size=batch_size)
        index = starts[:, None] + np.arange(self.seq_length + 1)
        return self.stream[index].astype(np.int64)
