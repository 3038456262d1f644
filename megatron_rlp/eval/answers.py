"""Answer extraction, matching and pass@k, as GSM8K and MATH evaluations do them.

Extraction from a generated (or gold) text, first rule that applies:

    1. `\\boxed{...}` (MATH): the content of the last one, braces balanced
    2. `#### 42` (GSM8K gold answers and trained formats): what follows the last `####`
    3. `The answer is 42` / `Answer: 42`: what follows the last such phrase
    4. otherwise (`mode="first"`, the default for answers generated right after a prompt that
       ends where the answer starts) the first number, or (`mode="last"`, chain-of-thought
       outputs) the last number; text without a number is returned stripped

Matching: `numeric` compares numbers (commas, `$`, a trailing `.`, `%` dropped; `1/2`
fractions and `1e3` accepted; equal within 1e-6 relative), `exact` compares normalised
strings (case, surrounding spaces and punctuation, `\\text{}`, spaces inside ignored).

pass@k is the unbiased estimator of Chen et al. 2021 (HumanEval, eq. 1): with n samples of
which c are correct, pass@k = 1 - C(n-c, k) / C(n, k), computed as a stable product.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?")
_ANSWER_IS = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*:)\s*", re.IGNORECASE)


def _boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str, mode: str = "first") -> str:
    """The answer in `text` by the rules in the module docstring.

    Args:
        mode: "first" or "last": which number rule 4 takes.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in ("first", "last"):
        raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1]
        mode = "first"
    else:
        phrases = list(_ANSWER_IS.finditer(text))
        if phrases:
            text = text[phrases[-1].end():]
            mode = "first"
    numbers = _NUMBER.findall(text)
    if not numbers:
        return text.strip()
    return (numbers[0] if mode == "first" else numbers[-1]).strip()


def parse_number(text: str) -> Fraction | None:
    """A number written as an integer, decimal, `a/b` fraction or with an exponent, allowing
    `,` separators, `$`, `%` and a trailing `.`; None if `text` is not one number."""
    t = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".").rstrip("%")
    t = re.sub(r"\\text\{[^}]*\}", "", t)
    frac = re.fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", t)
    if frac:
        t = f"{frac.group(1)}/{frac.group(2)}"
    try:
        if re.fullmatch(r"-?\d+/\d+", t):
            num, den = t.split("/")
            return Fraction(int(num), int(den)) if int(den) else None
        return Fraction(t) if re.fullmatch(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", t) else None
    except (ValueError, ZeroDivisionError):
        return None


def normalize(text: str) -> str:
    """Lower case, `\\text{}` unwrapped, whitespace removed, surrounding punctuation and `$`
    stripped: the string `exact` matching compares."""
    t = re.sub(r"\\text\{([^}]*)\}", r"\1", text)
    t = re.sub(r"\s+", "", t.lower())
    return t.strip(".,;:!?$'\"")


def is_match(prediction: str, gold: str, kind: str = "numeric") -> bool:
    """Whether an extracted prediction equals the gold answer.

    Args:
        kind: "numeric" (numbers compared as numbers when both parse; otherwise as `exact`)
            or "exact".

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in ("numeric", "exact"):
        raise ValueError(f"match must be 'numeric' or 'exact', got {kind!r}")
    if kind == "numeric":
        p, g = parse_number(prediction), parse_number(gold)
        if p is not None and g is not None:
            return p == g or abs(float(p - g)) <= 1e-6 * max(abs(float(g)), 1.0)
    return normalize(prediction) == normalize(gold)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, eq. 1).

    Raises:
        ValueError: unless 0 <= c <= n and 1 <= k <= n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i): C(n-c, k)/C(n, k) without huge binomials
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
