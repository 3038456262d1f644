"""Trains the tiny byte-level BPE tokenizer used by the tests (tests/assets/tiny_bpe/).

A real Hugging Face tokenizer.json exercises the HF loading path without network access or a
large file: 512 ids trained on the shipped corpus, with `<think>` / `</think>` as specials.

Usage: python tools/make_test_tokenizer.py [--corpus data/corpus.jsonl]
    [--out tests/assets/tiny_bpe/tokenizer.json] [--vocab-size 512]
"""

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<think>", "</think>"]


def main() -> None:
    """Trains the tokenizer on the corpus' texts and saves it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("tests/assets/tiny_bpe/tokenizer.json"))
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args()

    with args.corpus.open(encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out))
    print(f"wrote {args.out}: {tokenizer.get_vocab_size()} ids, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
