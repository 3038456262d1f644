"""Strict UTF-8 reading of corpus files, with errors that name the file and line.

Python's own messages (`'utf-8' codec can't decode byte 0xe9 in position 1827`) name neither
the file nor the line, and the position is within whatever buffer was being decoded, not the
file. A JSON `\\ud800` escape decodes to a lone surrogate, which no tokenizer can encode
(`can't encode character`), again with no line. Both are refused here, as invalid JSON is:
`FILE:LINE: what is wrong`. Used by the trainer (data/corpus.py) and
tools/preprocess_data.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

_SURROGATE = re.compile("[\ud800-\udfff]")


def _invalid(path: Path | str, lineno: int, line: bytes, start: int, offset: int,
             e: UnicodeDecodeError) -> ValueError:
    bad = line[e.start:e.end].hex(" ")
    return ValueError(f"{path}:{lineno}: invalid UTF-8 (byte{'s' if e.end - e.start > 1 else ''}"
                      f" 0x{bad.replace(' ', ' 0x')} at file offset {offset + e.start}, column "
                      f"{e.start - start + 1}: {e.reason}; allowed: UTF-8 text)")


def utf8_lines(path: Path | str) -> Iterator[tuple[int, str]]:
    """(line number from 1, decoded line) of a UTF-8 text file, line endings kept.

    Raises:
        ValueError: a line that is not valid UTF-8: "FILE:LINE: invalid UTF-8 (byte 0x.. at
            file offset N, column C: reason; ...)".
    """
    offset = 0
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _invalid(path, lineno, raw, 0, offset, e) from None
            offset += len(raw)


def read_utf8(path: Path | str) -> str:
    """The whole file decoded as UTF-8 (a `.txt` corpus).

    Raises:
        ValueError: invalid UTF-8, as `utf8_lines` names it.
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        start = data.rfind(b"\n", 0, e.start) + 1
        raise _invalid(path, data.count(b"\n", 0, e.start) + 1, data, start, 0, e) from None


def check_text(path: Path | str, lineno: int, text: str, key: str = "text") -> str:
    """`text` itself if it holds no lone surrogate (a `\\ud800`-style JSON escape without
    its pair); JSON's escaped pairs decode to one character and pass.

    Raises:
        ValueError: "FILE:LINE: lone surrogate \\ud800 in the "text" field at character N".
    """
    found = _SURROGATE.search(text)
    if found is not None:
        raise ValueError(f'{path}:{lineno}: lone surrogate \\u{ord(found.group()):04x} in the '
                         f'"{key}" field at character {found.start()} (allowed: valid '
                         "Unicode; a surrogate escape needs its pair, e.g. \\ud83d\\ude00)")
    return text
