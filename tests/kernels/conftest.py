"""Fixtures of the kernel tests: the GPU path's Triton kernels on CPU (`helpers.triton_cpu`).

- `kernels`: the interpreted kernel modules; the interpreter context stays open for the whole
  `tests/kernels` package (imports once) and is closed after its last test, so the rest of
  the suite sees the modules and `torch.cuda` it imported.
- `kernel_path`: Megatron's `MambaMixer` bound to those kernels (`adapter.select_kernels`)
  for one test, the torch path bound again after it.
"""

from __future__ import annotations

import pytest
from helpers.triton_cpu import triton_on_cpu


@pytest.fixture(scope="package")
def kernels():
    with triton_on_cpu() as k:
        yield k


@pytest.fixture
def kernel_path(kernels):
    from megatron_rlp.models.mamba import adapter

    adapter.select_kernels(force=adapter.MAMBA_SSM)
    try:
        yield kernels
    finally:
        adapter.select_kernels(force=adapter.TORCH)
