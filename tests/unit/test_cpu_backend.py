"""The `device: cpu` backend: CUDA devices, RNG and type strings mapped onto the CPU.

The backend patches torch process-wide (and idempotently): every test module shares it.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_rlp import distributed
from megatron_rlp.backends import cpu
from megatron_rlp.config import load_config

cpu.activate()


def test_activate_is_idempotent():
    factory = torch.zeros
    cpu.activate()
    assert cpu.is_active() and torch.zeros is factory  # not wrapped twice


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda"), 0])
def test_cuda_devices_land(device):
    assert torch.zeros(2, device=device).device.type == "cpu"
    assert torch.full((2,), 3.0, device=device).device.type == "cpu"
    assert torch.arange(3, device=device).device.type == "cpu"
    assert torch.tensor([1, 2], device=device).device.type == "cpu"
    assert torch.zeros_like(torch.ones(2), device=device).device.type == "cpu"
    assert torch.ones(2).to(device).device.type == "cpu"
    assert torch.ones(2).to(device=device, dtype=torch.float64).dtype == torch.float64


def test_current_device_and_cuda_calls():
    t = torch.empty(3, 4, device=torch.cuda.current_device())
    assert t.device.type == "cpu" and t.shape == (3, 4)
    x = torch.ones(2)
    assert x.cuda() is x and x.cuda(0).device.type == "cpu"
    lin = torch.nn.Linear(2, 2)
    assert lin.cuda() is lin and lin.weight.device.type == "cpu"
    assert torch.cuda.device_count() == 1
    torch.cuda.synchronize()
    torch.cuda.set_device(0)
    stream = torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.Stream())
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    assert event.query()
    # Non-cuda requests are left alone.
    assert torch.ones(2).to(torch.float64).dtype == torch.float64
    assert torch.zeros(2, device="meta").device.type == "meta"


def test_cuda_rng_drives_cpu_generator():
    torch.cuda.manual_seed(7)
    a = torch.rand(5)
    torch.cuda.manual_seed(7)
    assert torch.equal(torch.rand(5), a)
    assert torch.equal(a, torch.rand(5, generator=torch.Generator().manual_seed(7)))

    state = torch.cuda.get_rng_state()
    assert torch.equal(state, torch.get_rng_state())  # one generator, not two
    x = torch.randn(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.randn(4), x)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.randn(4, device="cuda"), x)


def test_torch_manual_seed_does_not_recurse():
    gen = torch.manual_seed(11)
    assert isinstance(gen, torch.Generator)
    a = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(torch.rand(3), a)


def test_type_strings():
    f = torch.ones(2)
    assert f.type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.long).type() == "torch.cuda.LongTensor"
    d = f.type(torch.float64)
    assert isinstance(d, torch.Tensor) and d.dtype == torch.float64 and d.device.type == "cpu"
    assert f.type(dtype=torch.int32).dtype == torch.int32


@pytest.fixture
def megatron_groups():
    distributed.initialize(load_config())
    yield
    distributed.shutdown()


def test_megatron_rng_tracker_fork(megatron_groups):
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    assert {"model-parallel-rng", "data-parallel-rng"} <= set(tracker.get_states())

    torch.manual_seed(5)
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # default stream restored
    # Megatron seeds the model-parallel stream with seed + 2718 + tp_rank.
    assert torch.equal(a, torch.rand(4, generator=torch.Generator().manual_seed(123 + 2718)))
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the tracked stream advanced

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    with tracker.fork():
        assert torch.equal(torch.rand(4), a)
    with tracker.fork("data-parallel-rng"):
        c = torch.rand(4)
    assert torch.equal(c, torch.rand(4, generator=torch.Generator().manual_seed(123)))

    # Dropout inside the fork is reproducible from the seed.
    tensor_parallel.model_parallel_cuda_manual_seed(9)
    with tracker.fork():
        d1 = torch.nn.functional.dropout(torch.ones(64), 0.5)
    tensor_parallel.model_parallel_cuda_manual_seed(9)
    with tracker.fork():
        d2 = torch.nn.functional.dropout(torch.ones(64), 0.5)
    assert torch.equal(d1, d2) and 0 < int((d1 == 0).sum()) < 64
