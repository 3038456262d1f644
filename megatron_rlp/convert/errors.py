"""The converter's one error, apart so that the mapping and its refusals both raise it
without importing each other."""


class ConversionError(ValueError):
    """A checkpoint or config this converter cannot map (the message says why)."""
