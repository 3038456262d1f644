"""Hugging Face `tokenizer.json` loading, so RLP can run on a real base model's vocabulary.

Only the `tokenizers` library is used (no `transformers`, no hub access): the file must be on
disk. Base-model tokenizers rarely have the thought markers, so they are added as special
tokens when missing; the model's embedding must then cover `vocab_size`.
"""

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFBackend

from megatron_rlp.tokenizer.base import THINK_END, THINK_START, Tokenizer

logger = logging.getLogger(__name__)

# Candidates, in order of preference, when tokenizer_config.json does not name the token.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|im_end|>", "<|end_of_text|>", "<eos>")
_PAD_NAMES = ("<pad>", "<|pad|>")


def _resolve_file(path: str | Path) -> Path:
    """Returns the tokenizer.json named by `path` (the file itself or its directory)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"tokenizer not found: {file} (expected a Hugging Face tokenizer.json file or a "
            f"directory containing one; use 'byte' for the built-in byte tokenizer)"
        )
    return file


def _config_tokens(config_file: Path) -> dict[str, str]:
    """Reads bos/eos/pad token strings from a tokenizer_config.json, if there is one."""
    if not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text(encoding="utf-8"))
    tokens = {}
    for role in ("bos", "eos", "pad"):
        value = config.get(f"{role}_token")
        if isinstance(value, dict):  # serialized AddedToken
            value = value.get("content")
        if isinstance(value, str) and value:
            tokens[role] = value
    return tokens


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer with RLP's special ids resolved.

    Args:
        path: A tokenizer.json file, or a directory containing one (and optionally a
            tokenizer_config.json naming bos_token / eos_token / pad_token).

    Raises:
        FileNotFoundError: No tokenizer.json at `path`.
        ValueError: No end-of-sequence token can be found, or tokenizer_config.json names a
            token the vocabulary lacks.
    """

    def __init__(self, path: str | Path) -> None:
        file = _resolve_file(path)
        self.name = str(file)
        self._tok = _HFBackend.from_file(str(file))
        configured = _config_tokens(file.parent / "tokenizer_config.json")

        self.eos = self._find("eos", configured, _EOS_NAMES)
        if self.eos is None:
            raise ValueError(
                f"{file}: no end-of-sequence token; expected eos_token in "
                f"tokenizer_config.json or one of {', '.join(_EOS_NAMES)}"
            )
        bos = self._find("bos", configured, _BOS_NAMES)
        pad = self._find("pad", configured, _PAD_NAMES)
        self.bos = self.eos if bos is None else bos
        self.pad = self.eos if pad is None else pad

        self.think_start = self._think_id(THINK_START)
        self.think_end = self._think_id(THINK_END)
        # One past the largest id, which is get_vocab_size unless added ids leave a gap.
        largest = max(self._tok.get_vocab(with_added_tokens=True).values())
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), largest + 1)

    def _find(self, role: str, configured: dict[str, str], names: Sequence[str]) -> int | None:
        """Returns the id of the configured token for `role`, else of the first known name."""
        if role in configured:
            token_id = self._tok.token_to_id(configured[role])
            if token_id is None:
                raise ValueError(
                    f"{self.name}: tokenizer_config.json names {role}_token "
                    f"{configured[role]!r}, which is not in the vocabulary"
                )
            return token_id
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def _think_id(self, token: str) -> int:
        """Returns the id of a thought marker, adding it as a special token if missing."""
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            self._tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            token_id = self._tok.token_to_id(token)
            logger.warning(
                "%s has no %s token; added it as special token id %d (the model's embedding "
                "must cover the grown vocabulary)", self.name, token, token_id,
            )
        return token_id

    def encode(self, text: str) -> list[int]:
        """Returns the ids of `text`, without adding any special token."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes several texts in parallel (Rust threads)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`; specials appear as their text, bad UTF-8 as U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
