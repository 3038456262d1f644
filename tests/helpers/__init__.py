"""Shared test helpers: tiny models, the independent step reference, checkpoint-run helpers.

Imported as `helpers.<module>` (tests/ is on sys.path through the rootdir conftest)."""
