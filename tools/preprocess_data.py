"""Tokenize JSONL / plain-text corpora into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).

    python tools/preprocess_data.py --input data/corpus.jsonl --output-prefix data/corpus_byte \
        --tokenizer byte --workers 2

One input record is one document and becomes one sequence of the dataset, in input order
(documents are never merged or split). JSONL: one object per line with a string field
(`--json-key`, default "text"); blank lines are skipped, anything else that is not such an
object, a line that is not UTF-8 and a text with a lone surrogate (a `\\ud800` escape without
its pair) are errors naming the file and line. `.txt`: documents separated by blank lines.
The end-of-document id is appended to every document unless `--no-append-eod` (Megatron's
`--append-eod` convention; training on NTP windows needs it between documents, while RLP
contexts never target it: the document view drops it). Documents that tokenize to nothing are
skipped and counted. The tokenizer is `byte`, a Hugging Face tokenizer.json (or its
directory) or a SentencePiece `.model` — the same spec as `data.tokenizer`, which training must
use too. PREFIX.json records the tokenizer and counts; training refuses a dataset whose
vocabulary differs from `data.tokenizer`'s.

Tokenization runs in `--workers` processes on chunks of `--chunk-size` documents; the writer
keeps input order, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_TOKENIZER = None


def _init_worker(spec: str) -> None:
    global _TOKENIZER
    from megatron_rlp.tokenizer import build_tokenizer

    _TOKENIZER = build_tokenizer(spec)


def _texts_of(chunk: tuple[str, str, list[tuple[int, str]]]) -> list[str]:
    from megatron_rlp.data.utf8 import check_text

    path, key, lines = chunk
    if path.endswith(".txt"):
        return [text for _, text in lines]
    texts = []
    for lineno, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise ValueError(f'{path}:{lineno}: expected an object with a string "{key}" field')
        texts.append(check_text(path, lineno, record[key], key))
    return texts


def _encode(chunk) -> tuple[list[np.ndarray], int]:
    """Worker: parse and tokenize one chunk; returns (documents, input bytes)."""
    texts = _texts_of(chunk)
    nbytes = sum(len(line) for _, line in chunk[2])
    return [np.asarray(ids, dtype=np.int64) for ids in _TOKENIZER.encode_batch(texts)], nbytes


def _chunks(inputs: list[Path], key: str, size: int) -> Iterator[tuple[str, str, list]]:
    from megatron_rlp.data.utf8 import read_utf8, utf8_lines

    for path in inputs:
        if path.suffix == ".txt":
            text = read_utf8(path)
            blocks = [b.strip() for b in re.split(r"\n[ \t\r]*\n", text) if b.strip()]
            for i in range(0, len(blocks), size):
                yield str(path), key, [(0, b) for b in blocks[i:i + size]]
            continue
        chunk: list[tuple[int, str]] = []
        for lineno, line in utf8_lines(path):  # invalid UTF-8: FILE:LINE named
            if not line.strip():
                continue
            chunk.append((lineno, line))
            if len(chunk) == size:
                yield str(path), key, chunk
                chunk = []
        if chunk:
            yield str(path), key, chunk


class Progress:
    """One status line on stderr: documents, tokens, throughput (redrawn on a terminal)."""

    def __init__(self, total_bytes: int, enabled: bool = True) -> None:
        self.total, self.enabled = max(total_bytes, 1), enabled
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.perf_counter()
        self.docs = self.tokens = self.bytes = 0

    def update(self, docs: int, tokens: int, nbytes: int, force: bool = False) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        now = time.perf_counter()
        if not self.enabled or (now - self.last < (0.5 if self.tty else 5.0) and not force):
            return
        self.last = now
        dt = max(now - self.start, 1e-9)
        frac = min(self.bytes / self.total, 1.0)
        width = 24
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        line = (f"[{bar}] {100 * frac:5.1f}%  {self.docs:,} docs  {self.tokens:,} tokens  "
                f"{self.docs / dt:,.0f} docs/s  {self.tokens / dt:,.0f} tok/s  "
                f"{self.bytes / dt / 2**20:.2f} MiB/s  {dt:.1f}s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        self.update(0, 0, 0, force=True)
        if self.enabled and self.tty:
            print(file=sys.stderr)


def preprocess(inputs: list[Path], output_prefix: str, tokenizer_spec: str, *, workers: int = 1,
               json_key: str = "text", append_eod: bool = True, chunk_size: int = 64,
               progress: bool = True) -> dict:
    """Tokenize `inputs` into `output_prefix`.bin/.idx/.json; returns the metadata written.

    Raises:
        FileNotFoundError: An input does not exist.
        ValueError: A bad JSONL line (file:line in the message), or no document at all.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_rlp.tokenizer import build_tokenizer

    for path in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"input not found: {path}")
    tokenizer = build_tokenizer(tokenizer_spec)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    bin_path, idx_path = f"{output_prefix}.bin", f"{output_prefix}.idx"
    builder = IndexedDatasetBuilder(bin_path, dtype=dtype)
    bar = Progress(sum(p.stat().st_size for p in inputs), enabled=progress)
    docs = tokens = skipped = 0
    chunks = _chunks(inputs, json_key, chunk_size)
    pool = None
    try:
        if workers > 1:
            pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_spec,))
            results = pool.imap(_encode, chunks, chunksize=1)
        else:
            _init_worker(tokenizer_spec)
            results = map(_encode, chunks)
        for encoded, nbytes in results:
            n_docs = n_tokens = 0
            for ids in encoded:
                if len(ids) == 0:
                    skipped += 1
                    continue
                if append_eod:
                    ids = np.append(ids, tokenizer.eod)
                builder.add_document(ids, [len(ids)])
                n_docs += 1
                n_tokens += len(ids)
            docs, tokens = docs + n_docs, tokens + n_tokens
            bar.update(n_docs, n_tokens, nbytes)
    except BaseException:
        builder.data_file.close()
        for p in (bin_path, idx_path):
            Path(p).unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    if docs == 0:
        builder.data_file.close()
        Path(bin_path).unlink(missing_ok=True)
        raise ValueError("no usable document in the input (all empty)")
    builder.finalize(idx_path)
    meta = {
        "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod,
        "append_eod": append_eod, "dtype": np.dtype(dtype).name, "documents": docs,
        "tokens": tokens, "skipped_empty": skipped, "inputs": [str(p) for p in inputs],
        "json_key": json_key,
    }
    Path(f"{output_prefix}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", type=Path, required=True,
                        help="JSONL or .txt files, read in this order")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX.bin, PREFIX.idx and PREFIX.json")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte', a tokenizer.json (or its directory) or a SentencePiece "
                             ".model; the same value as data.tokenizer")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                        help="tokenizer processes (default: all cores)")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--chunk-size", type=int, default=64, help="documents per worker task")
    parser.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                        help="do not append the end-of-document id to each document")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.chunk_size < 1:
        print("error: --workers and --chunk-size must be >= 1", file=sys.stderr)
        return 2
    from megatron_rlp.startup import quiet_megatron

    # Megatron warns at import about GPU kernels (TE, Apex) that tokenizing never uses.
    quiet_megatron(checkpoint=False)
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import time is not throughput)

    start = time.perf_counter()
    try:
        meta = preprocess(args.input, args.output_prefix, args.tokenizer, workers=args.workers,
                          json_key=args.json_key, append_eod=args.append_eod,
                          chunk_size=args.chunk_size, progress=not args.quiet)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - start
    print(f"wrote {args.output_prefix}.bin/.idx: {meta['documents']:,} documents, "
          f"{meta['tokens']:,} tokens ({meta['dtype']}), {meta['skipped_empty']} empty skipped, "
          f"{dt:.1f}s ({meta['tokens'] / max(dt, 1e-9):,.0f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
