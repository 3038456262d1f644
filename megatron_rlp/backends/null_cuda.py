"""Do-nothing CUDA streams, events and functions: what code written for a GPU waits on, where
no CUDA runtime runs. Shared by the CPU backend (`backends/cpu.py`, which patches them into
`torch.cuda` for `device: cpu`) and the fake-CUDA simulation (`tools/simulated_cuda.py`);
importing this module patches nothing."""

from __future__ import annotations


class NullStream:
    """Stands in for `torch.cuda.Stream`: DDP and the optimizer only wait on / sync streams."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class NullEvent:
    """Stands in for `torch.cuda.Event`: recorded and complete at once."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def fresh_noop():
    """A fresh do-nothing function. One object per patched name: Dynamo maps torch functions
    to tracing rules by object, and rebuilds that map whenever a process group is created
    (`torch.distributed` clears its caches); one shared stub standing for names with different
    rules (`torch.cuda.synchronize`, `torch.cuda.set_device`, ...) makes the next
    `torch.compile` fail with "Duplicate torch object" (Megatron compiles some modules at
    import, e.g. its gated-delta-net kernels)."""

    def noop(*args, **kwargs):
        return None

    return noop
