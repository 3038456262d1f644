"""Megatron indexed datasets (`PREFIX.bin` / `PREFIX.idx`) as RLP document sources.

tools/preprocess_data.py writes one indexed-dataset *sequence* per document (with the end-of-
document id appended, Megatron's `--append-eod` convention). Training reads them through
Megatron-Core's own `BlendedMegatronDatasetBuilder`, which does the blending (weights) and the
train/valid/test split (ranges of documents, `data.split`):

- RLP draws (document, position) contexts, so it needs whole documents: `DocumentDataset` is a
  `MegatronDataset` whose sample i is one whole document, in an order shuffled per epoch from
  the seed; a blend is Megatron's `BlendedDataset` over several of them, so a document of a
  dataset with weight 0.7 is drawn 70% of the time. `IndexedCorpus` exposes the result with
  the same surface as `TokenizedCorpus` (`documents[i]`, `lengths`, `eos`): the context sampler
  and the batch builders work on either. The trailing end-of-document id is not part of a
  document's view (the JSONL path has none either).
- Next-token (NTP) training uses Megatron's `GPTDataset` windows over the same blend and split
  (`IndexedCorpus.gpt_windows`), documents joined by their end-of-document ids.

Everything is a function of (files, split, seed): any rank, and a resumed run, sees the same
documents in the same order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    BlendedMegatronDatasetConfig,
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from megatron_rlp.config.sections import BlendError, parse_blend  # noqa: F401 (a config rule)
from megatron_rlp.data.corpus import TokenizedCorpus
from megatron_rlp.tokenizer import Tokenizer

SPLITS = ("train", "valid", "test")


class _CacheNoticeOnce(logging.Filter):
    """Megatron's `BlendedDataset` logs "Cannot save the BlendedDataset indexes because
    path_to_cache is None" for every split it builds (twice per blend run, four times with NTP
    windows). Said once per process, with the key that silences it."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "path_to_cache is None" not in str(record.msg):
            return True
        if _CacheNoticeOnce.said:
            return False
        _CacheNoticeOnce.said = True
        record.msg = (f"{record.msg} (data.cache_dir is unset: the blend's indexes are "
                      "rebuilt at each start; said once)")
        record.args = ()
        return True


logging.getLogger("megatron.core.datasets.blended_dataset").addFilter(_CacheNoticeOnce())


def is_indexed_prefix(path: str | Path) -> bool:
    """True when `path.bin` and `path.idx` both exist."""
    return Path(f"{path}.bin").is_file() and Path(f"{path}.idx").is_file()


def metadata_path(prefix: str | Path) -> Path:
    """The JSON file tools/preprocess_data.py writes beside `prefix.bin` / `prefix.idx`."""
    return Path(f"{prefix}.json")


def check_tokenizer(prefix: str, tokenizer: Tokenizer) -> None:
    """Refuse a dataset tokenized for another vocabulary (when its metadata file says so).

    Raises:
        ValueError: The metadata names another vocabulary size or end-of-document id.
    """
    meta_file = metadata_path(prefix)
    if not meta_file.is_file():
        return  # e.g. made by Megatron-LM's own tools/preprocess_data.py
    meta = json.loads(meta_file.read_text())
    for key, ours in (("vocab_size", tokenizer.vocab_size), ("eod", tokenizer.eod)):
        if key in meta and meta[key] != ours:
            raise ValueError(
                f"{prefix}: tokenized with {meta.get('tokenizer')!r} ({key}={meta[key]}), but "
                f"data.tokenizer={tokenizer.name!r} has {key}={ours}; re-run "
                f"tools/preprocess_data.py with this tokenizer"
            )


def split_ranges(num_documents: int, split: str) -> list[tuple[int, int] | None]:
    """Megatron's document ranges of each split (same rounding as the dataset builder)."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if m is None else (int(round(m[0] * num_documents)),
                                    int(round(m[1] * num_documents))) for m in matrix]


def split_corpus(corpus: TokenizedCorpus, split: str) -> list[TokenizedCorpus | None]:
    """A JSONL/.txt corpus cut into train/valid/test by document ranges, as Megatron cuts an
    indexed dataset (the first documents train, the next ones validate)."""
    out: list[TokenizedCorpus | None] = []
    for name, rng in zip(SPLITS, split_ranges(len(corpus), split), strict=True):
        if rng is None or rng[1] <= rng[0]:
            out.append(None)
            continue
        path = corpus.path if name == "train" else Path(f"{corpus.path}[{name}]")
        answers = corpus.answer_positions
        out.append(TokenizedCorpus(path=path, documents=corpus.documents[rng[0]:rng[1]],
                                   eos=corpus.eos, answer_positions=None if answers is None
                                   else answers[rng[0]:rng[1]]))
    return out


class DocumentDataset(MegatronDataset):
    """A Megatron mid-level dataset whose sample i is one whole document.

    The documents of the split (`indexed_indices`) are visited in epochs, each a permutation
    drawn from (seed, split, epoch); `num_samples` (None = one epoch) may span several epochs.
    """

    def __init__(self, indexed_dataset: IndexedDataset, dataset_path: str | None,
                 indexed_indices: np.ndarray, num_samples: int | None, index_split: Split,
                 config: BlendedMegatronDatasetConfig) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples,
                         index_split, config)
        n = len(indexed_indices)
        want = n if num_samples is None else int(num_samples)
        if n == 0 and want > 0:
            raise ValueError(f"{dataset_path}: the {index_split.name} split has no document "
                             f"(data.split={config.split!r} over too few documents)")
        epochs = -(-want // n) if n else 0
        order = [np.random.default_rng([config.random_seed, index_split.value, e])
                 .permutation(indexed_indices) for e in range(epochs)]
        self.document_ids = (np.concatenate(order)[:want] if order
                             else np.zeros(0, dtype=np.int64)).astype(np.int64)
        self.raw_lengths = indexed_dataset.sequence_lengths[self.document_ids].astype(np.int64)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: IndexedDataset) -> int:
        return low_level_dataset.sequence_lengths.shape[0]

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: BlendedMegatronDatasetConfig
                                ) -> IndexedDataset:
        return IndexedDataset(dataset_path, multimodal=False, mmap=config.mmap_bin_files)

    def __len__(self) -> int:
        return len(self.document_ids)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        return {"tokens": self.dataset.get(int(self.document_ids[idx]))}

    def last_tokens(self) -> np.ndarray:
        """The last token of every sample, read from the memory-mapped .bin in one gather."""
        index = self.dataset.index
        tokens = np.memmap(f"{self.dataset.path_prefix}.bin", dtype=index.dtype, mode="r")
        start = index.sequence_pointers[self.document_ids] // np.dtype(index.dtype).itemsize
        return np.asarray(tokens[start + self.raw_lengths - 1], dtype=np.int64)


class _Documents(Sequence):
    """Random access to the documents of an `IndexedCorpus` (int32, read-only, eod cut)."""

    def __init__(self, corpus: IndexedCorpus) -> None:
        self._c = corpus

    def __len__(self) -> int:
        return len(self._c.lengths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        c = self._c
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        part = c.parts[c.part_index[i]]
        doc = part.dataset.get(int(part.document_ids[c.part_sample[i]]), length=int(c.lengths[i]))
        doc = np.asarray(doc, dtype=np.int32)  # the .bin may hold uint16
        doc.setflags(write=False)
        return doc


class IndexedCorpus:
    """Documents of one split of a (blended) indexed dataset, shaped like `TokenizedCorpus`.

    Attributes:
        path: What the documents come from, for messages.
        documents: Random access, `documents[i]` -> int32 tokens of sample i.
        lengths: Token count of every sample (int64), trailing end-of-document id excluded.
        eos: End-of-document id.
        dataset: The Megatron top-level dataset (`DocumentDataset` or `BlendedDataset`).
    """

    def __init__(self, dataset: DocumentDataset | BlendedDataset, eos: int, path: str,
                 gpt_spec: dict) -> None:
        self.dataset, self.eos, self.path = dataset, eos, path
        self._gpt_spec = gpt_spec
        if isinstance(dataset, BlendedDataset):
            self.parts = list(dataset.datasets)
            self.part_index = np.asarray(dataset.dataset_index, dtype=np.int64)
            self.part_sample = np.asarray(dataset.dataset_sample_index, dtype=np.int64)
        else:
            self.parts = [dataset]
            self.part_index = np.zeros(len(dataset), dtype=np.int64)
            self.part_sample = np.arange(len(dataset), dtype=np.int64)
        lengths = np.zeros(len(self.part_index), dtype=np.int64)
        for k, part in enumerate(self.parts):
            sel = self.part_index == k
            own = part.raw_lengths - (part.last_tokens() == eos)
            lengths[sel] = own[self.part_sample[sel]]
        self.lengths = lengths
        self.documents = _Documents(self)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def gpt_windows(self, seq_length: int, seed: int) -> GPTDataset | BlendedDataset:
        """Megatron `GPTDataset` windows of `seq_length + 1` tokens over the same blend and split
        (built on every rank, collectively when torch.distributed runs)."""
        s = self._gpt_spec
        prefixes, weights, split = s["prefixes"], s["weights"], s["split"]
        token_counts = np.zeros(3, dtype=np.int64)
        for prefix in prefixes:
            index = IndexedDataset(prefix, multimodal=False, mmap=True)
            cum = np.concatenate([[0], np.cumsum(index.sequence_lengths, dtype=np.int64)])
            for i, rng in enumerate(split_ranges(len(index.sequence_lengths), split)):
                if rng is not None:
                    token_counts[i] += cum[rng[1]] - cum[rng[0]]
        sizes = [None] * 3
        if weights is not None:  # Megatron needs a sample count to blend by weights
            sizes = [max(1, int(t) // seq_length) for t in token_counts]
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
            tokenizer=s["tokenizer"], path_to_cache=s["cache_dir"],
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False,
        )
        datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        dataset = datasets[s["split_index"]]
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"{self.path}: no window of {seq_length + 1} tokens")
        return dataset


@dataclass
class DataSplits:
    """Document sources of each split (None where `data.split` gives it no weight)."""

    train: TokenizedCorpus | IndexedCorpus
    valid: TokenizedCorpus | IndexedCorpus | None
    test: TokenizedCorpus | IndexedCorpus | None


def build_indexed_splits(prefixes: list[str], weights: list[float] | None, split: str,
                         tokenizer: Tokenizer, seed: int, cache_dir: str | None = None
                         ) -> list[IndexedCorpus | None]:
    """Train/valid/test document sources of a blend, through `BlendedMegatronDatasetBuilder`.

    Call on every rank (the builder synchronizes ranks when torch.distributed runs).

    Raises:
        FileNotFoundError: A prefix has no .bin/.idx.
        ValueError: A dataset was tokenized with another tokenizer, or a split that has a weight
            gets no document of some dataset.
    """
    for prefix in prefixes:
        if not is_indexed_prefix(prefix):
            raise FileNotFoundError(f"indexed dataset not found: {prefix}.bin / {prefix}.idx")
        check_tokenizer(prefix, tokenizer)
    counts = np.zeros(3, dtype=np.int64)
    for prefix in prefixes:
        n = len(IndexedDataset(prefix, multimodal=False, mmap=True).sequence_lengths)
        for i, rng in enumerate(split_ranges(n, split)):
            if rng is not None:
                if rng[1] <= rng[0]:
                    raise ValueError(f"{prefix}: {n} documents leave the {SPLITS[i]} split of "
                                     f"data.split={split!r} empty")
                counts[i] += rng[1] - rng[0]
    # With weights Megatron needs a size: one nominal epoch of the split's documents.
    sizes = [None] * 3 if weights is None else [max(1, int(c)) for c in counts]
    config = BlendedMegatronDatasetConfig(
        random_seed=seed, sequence_length=1, blend=(prefixes, weights), split=split,
        tokenizer=tokenizer, path_to_cache=cache_dir,
    )
    built = BlendedMegatronDatasetBuilder(DocumentDataset, sizes, lambda: True, config).build()
    name = " + ".join(prefixes) if weights is None else " + ".join(
        f"{w:g}*{p}" for w, p in zip(weights, prefixes, strict=True))
    out: list[IndexedCorpus | None] = []
    for i, dataset in enumerate(built):
        if dataset is None or len(dataset) == 0:
            out.append(None)
            continue
        spec = dict(prefixes=prefixes, weights=weights, split=split, tokenizer=tokenizer,
                    cache_dir=cache_dir, split_index=i)
        out.append(IndexedCorpus(dataset, tokenizer.eod, f"{name}[{SPLITS[i]}]", spec))
    return out


def load_data(corpus: str, blend: Sequence[str] | None, split: str, tokenizer: Tokenizer,
              seed: int, cache_dir: str | None = None) -> DataSplits:
    """The document sources of a run (`data.*` keys): a JSONL/.txt file, one indexed prefix,
    or a blend of indexed prefixes, cut into train/valid/test.

    Raises:
        FileNotFoundError: Neither a corpus file nor an indexed prefix at `corpus`.
        ValueError: Bad file contents, an empty train split, a tokenizer mismatch.
    """
    from megatron_rlp.data.corpus import load_corpus

    if blend is not None:
        prefixes, weights = parse_blend(blend)
        parts = build_indexed_splits(prefixes, weights, split, tokenizer, seed, cache_dir)
    elif is_indexed_prefix(corpus):
        parts = build_indexed_splits([corpus], None, split, tokenizer, seed, cache_dir)
    else:
        if not Path(corpus).is_file():
            raise FileNotFoundError(
                f"corpus file not found: {corpus} (expected a .jsonl/.txt file or an indexed-"
                f"dataset prefix with {corpus}.bin and {corpus}.idx)")
        parts = split_corpus(load_corpus(corpus, tokenizer), split)
    if parts[0] is None:
        raise ValueError(f"data.split={split!r} leaves no training document")
    return DataSplits(*parts)
