"""Shared test helpers: tiny models, the independent step reference, checkpoint-run helpers,
the GPU path's Triton kernels on CPU under the interpreter (`triton_cpu`).

Imported as `helpers.<module>` (tests/ is on sys.path through the rootdir conftest)."""
