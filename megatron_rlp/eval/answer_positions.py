"""RLP contexts at the answers of the generated task: the positions where thinking can pay.

The task corpus (`eval/tasks.py`) writes every item as `Question: ...\\nAnswer: <answer>`, a
share of them with their working first (`Answer: <think>...</think>7703`). The position
whose prediction needs the intermediate work is the answer's first token *when no worked
thought precedes it*: there the model must either know the answer or think first. That is
also exactly the position the held-out benchmark scores (`PROMPT` ends right before it).

`AnswerContextSampler` is the project's `ContextSampler` with one difference: a document's
candidate targets are those answer starts (found in the token ids by the `Answer: `
marker, so any tokenizer works, and a target right after the marker that is `<think>` is
not one). Everything else, the (seed, step) keying, the shared document window, the document
draw, is the parent's. Why a subclass and not a `rlp.position_strategy`: the task's answer
marker is a property of this corpus, not of pretraining text in general; the comparison tool
(tools/compare_rlp_ntp.py) uses it to aim RLP at the positions the evaluation measures.
"""

from __future__ import annotations

import numpy as np

from megatron_rlp.data import ContextSampler
from megatron_rlp.data.contexts import DocumentSource

ANSWER_MARKER = "Answer: "  # eval/tasks.PROMPT ends with it


def answer_start_mask(tokens: np.ndarray, marker: np.ndarray, think_start: int) -> np.ndarray:
    """Bool per position t of a document: is tokens[t] the first token of an answer written
    without a worked thought (tokens[t - len(marker):t] == marker and tokens[t] is not
    `<think>`)?

    Args:
        tokens: [T] token ids of one document.
        marker: [M] token ids of `ANSWER_MARKER` (M >= 1).
        think_start: the `<think>` id.

    Returns:
        [T] bool array (all False when the document has no such position).
    """
    tokens, marker = np.asarray(tokens), np.asarray(marker)
    m, n = len(marker), len(tokens)
    mask = np.zeros(n, dtype=bool)
    if n <= m:
        return mask
    # windows[j] = tokens[j:j+m]; a match at j makes t = j + m an answer start.
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], m)
    hits = np.flatnonzero((windows == marker).all(1)) + m
    hits = hits[tokens[hits] != think_start]
    mask[hits] = True
    return mask


class AnswerContextSampler(ContextSampler):
    """A `ContextSampler` whose targets are only the answer starts of `answer_start_mask`.

    Args:
        corpus, min_prefix, max_prefix, seed, strategy, stride: as `ContextSampler`
            ("uniform" or "stride"; "entropy" needs a scorer and is not used here).
        marker: token ids of `ANSWER_MARKER` under the run's tokenizer.
        think_start: the `<think>` id.

    Raises:
        ValueError: as `ContextSampler`, and from `sample` when too few documents have an
            answer start after `min_prefix` tokens.
    """

    def __init__(self, corpus: DocumentSource, min_prefix: int, max_prefix: int, seed: int, *,
                 marker: list[int], think_start: int, strategy: str = "uniform",
                 stride: int = 1) -> None:
        if not marker:
            raise ValueError("the answer marker encodes to no token")
        super().__init__(corpus, min_prefix, max_prefix, seed, strategy=strategy,
                         stride=stride, skip_spans=None)
        self.marker = np.asarray(marker, dtype=np.int64)
        self.think_start = think_start

    def _targets(self, tokens: np.ndarray) -> np.ndarray:
        # The parent draws among positions whose mask is True (and retries another document
        # when a document has none past min_prefix).
        return answer_start_mask(tokens, self.marker, self.think_start)
