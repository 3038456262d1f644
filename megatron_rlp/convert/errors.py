"""The converter's one error, apart so that the mapping and its refusals both raise it
without importing each other; and `take`, the weight lookup every mapping uses."""

from torch import Tensor


class ConversionError(ValueError):
    """A checkpoint or config this converter cannot map (the message says why)."""


def take(sd: dict[str, Tensor], key: str) -> Tensor:
    """Remove and return `sd[key]` (what is left at the end is reported as unused).

    Raises:
        ConversionError: `key` is missing.
    """
    if key not in sd:
        raise ConversionError(f"missing weight {key!r}")
    return sd.pop(key)
