"""Host values beside fake CUDA tensors, for `tools/simulate_gpu.py`.

`FakeTensorMode` knows shapes, dtypes and devices but no values. An RLP step reads values back
to the host in two kinds of places:

- values that come from the data (prefix lengths, document windows, the rows a chunk uses:
  `int(lengths.max())`, `torch.unique(rows)`); these are known exactly on a real GPU run;
- values that come from the model's outputs (which thoughts are closed, how long they are).

`HostValues` keeps the first kind exact: every integer, bool or fp64 tensor that is computed
only from host data (real CPU tensors, or fake CUDA tensors that carry a value) gets a
*shadow*, the same op run for real on the CPU, as long as it is small (`limit` elements).
Float tensors (weights, activations, log-probs) never get one: they would cost real memory
and compute, and the step reads them back only as metrics. A fake tensor with a shadow
answers `.item()`, `int()`, `bool()` and value-dependent shapes (`unique`, `nonzero`, boolean
indexing) from its shadow. Host-side tensor code (default device CPU, real inputs) runs for
real and never touches the fake mode, so a host tensor that meets a CUDA tensor in a device
op is a real host tensor, as it would be on a GPU (and `FakeTensorMode` refuses the mix).

Values of the second kind are unknowable without running the model; they are answered with
the memory worst case of the step. A small fake integer or fp64 tensor without a value
(a sampled token, a broadcast buffer; never an activation) reads as zeros: token id 0
is never `</think>`, so every thought runs to `max_thought_tokens` and no row is compacted,
and the update batch is as wide as it can be. A large one read as a float (a loss, a norm)
is 0.0 (`Oracle`); as an integer or a bool, or as a value-dependent shape, it fails naming
its file:line, so a new host sync in the step is seen rather than answered at random.

Why not `torch._functorch.config.fake_tensor_propagate_real_tensors`: it runs every op for
real, the model's included, which at full size needs the real memory and hours of CPU.
"""

from __future__ import annotations

import sys

import torch
from torch._subclasses.fake_tensor import (
    DynamicOutputShapeException,
    FakeTensor,
    unset_fake_temporarily,
)
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten


def caller_site(skip: tuple[str, ...] = ("/torch/", "/tools/simulated_")) -> str:
    """`file:line` of the innermost frame outside torch and this harness (the code that asked)."""
    f = sys._getframe(1)
    while f is not None and any(s in f.f_code.co_filename for s in skip):
        f = f.f_back
    if f is None:
        return "?"
    return f"{f.f_code.co_filename}:{f.f_lineno}"


class UnknownValue(RuntimeError):
    """A model-dependent value read back to the host that no `Oracle` rule answers."""


class Oracle:
    """Answers reads of values no shadow holds: large model outputs (a loss, a norm).

    A float reads as 0.0 and an `isfinite(...)` test as True (the step is applied, nothing
    is skipped); any other integer or bool fails with its file:line, since it could change
    what the step allocates. Every answered read is counted in `reads` (file:line -> count)
    for the report.
    """

    def __init__(self):
        self.reads: dict[str, int] = {}

    def answer(self, t: torch.Tensor, site: str) -> bool | float:
        self.reads[site] = self.reads.get(site, 0) + 1
        if t.dtype.is_floating_point:
            return 0.0
        if t.dtype == torch.bool and "isfinite" in _source_line(site):
            return True  # finite gradients: the update is applied (its memory counted)
        raise UnknownValue(f"model-dependent {t.dtype} read at {site}: "
                           f"{_source_line(site).strip()}")


def _source_line(site: str) -> str:
    import linecache

    path, _, line = site.rpartition(":")
    return linecache.getline(path, int(line)) if line.isdigit() else ""


def _mutated_args(func) -> list[int]:
    schema = getattr(func, "_schema", None)
    if schema is None:
        return []
    return [i for i, a in enumerate(schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write]


def _host_device(device) -> bool:
    return device is None or torch.device(device).type == "cpu"


def _has_value_dtype(out) -> bool:
    """Whether `out` has a tensor of a dtype whose values are tracked (`_VALUE_DTYPES`): ids,
    masks, lengths. Float values (activations, weights, their random init) never are: they
    would cost real memory and compute, and the step reads them only as metrics."""
    return any(t.dtype in _VALUE_DTYPES for t in pytree.tree_leaves(out)
               if isinstance(t, torch.Tensor))


def _numel(out) -> int:
    return sum(t.numel() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


# Factories whose real result is uninitialised memory: their shadows are zeros instead.
_EMPTY = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
          aten.new_empty.default, aten.new_empty_strided.default}


# Dtypes an unknown value may be read as zeros in: ids, masks, counts, and the fp64 buffer
# the pipeline broadcasts sampled ids in (`parallel.pipeline.from_last_stage`); never the
# bf16/fp32 of activations, so the model's compute is never run for real.
# A bool is never assumed (False would make `isfinite(loss)` report a NaN); bools derived
# from assumed ids (`tok == think_end`) get their values from the ids.
_ZERO_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float64}
_VALUE_DTYPES = _ZERO_DTYPES | {torch.bool}


# Value-dependent shapes that depend on the index (or mask) alone, not on the data indexed:
# `activation[known_mask]` has a known shape although the activation has no value.
_SHAPE_FROM_INDEX = {aten.index.Tensor, aten.masked_select.default}


class SimulationError(RuntimeError):
    """A device or dtype error of the simulated step, as one line (`describe_op_error`)."""


def _describe(t: torch.Tensor, names: dict[int, str]) -> str:
    name = names.get(id(t))
    dtype = str(t.dtype).removeprefix("torch.")
    what = f"{t.device} {dtype} {list(t.shape)}"
    return f"`{name}` ({what})" if name else f"({what})"


def describe_op_error(func, flat: list, error: Exception) -> str:
    """One line: the op, its tensors (named after the caller's variables where one holds
    them), the caller's file:line and the first line of the error."""
    site = caller_site(skip=("/torch/", "/tools/simulated_"))
    frame = sys._getframe(1)
    while frame is not None and f"{frame.f_code.co_filename}:{frame.f_lineno}" != site:
        frame = frame.f_back
    names = {}
    if frame is not None:
        names = {id(v): k for k, v in frame.f_locals.items() if isinstance(v, torch.Tensor)}
    tensors = ", ".join(_describe(t, names) for t in flat if isinstance(t, torch.Tensor))
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{func} on {tensors} at {site}: {first}"


class HostValues(TorchDispatchMode):
    """Runs host ops for real and shadows small fake-CUDA values (module docstring).

    Enter it inside the `FakeTensorMode` (so that it sees each op first). A device or dtype
    error of an op is raised as `SimulationError` with `describe_op_error`'s one line.

    Args:
        oracle: answers reads of values that no shadow holds.
        limit: largest shadow, in elements (bigger data-derived tensors lose their value).
            2**28: Nemotron Nano 12B's shared-prefix prefill mask is ~98M bools (2**26 lost
            it); the masks are bool (1 byte an element) and the int64 index tensors are far
            smaller, so shadows stay within a few GiB of host memory.
        zero_limit: a fake integer or fp64 tensor without a value, of at most this
            many elements, reads as zeros when an op with otherwise known inputs needs it: a
            sampled token is then id 0 (never `</think>`, so every thought runs to its
            limit), a broadcast buffer zeros. Activations are bf16/fp32, so the model's own
            compute never runs for real.
    """

    def __init__(self, oracle: Oracle, limit: int = 1 << 28, zero_limit: int = 1 << 16):
        super().__init__()
        self.oracle = oracle
        self.limit = limit
        self.zero_limit = zero_limit
        self._shadow = WeakTensorKeyDictionary()
        self._stale: set[int] = set()  # data_ptrs of shadows overwritten by unknown values
        self._opaque = 0  # > 0 inside `opaque` functions: no shadows
        # (func, args, out, value) -> [(fake, real)]: the values a collective's outputs hold
        # (`simulated_moe.collective_values`); None: a collective's outputs have none
        self.collectives = None

    def opaque(self, fn):
        """`fn`, whose result is float and whose integer insides no read needs, run without
        shadows (its ops still run on fake tensors, checked and counted as every op is).
        For the rollout's keyed noise (`rollout.sampling.keyed_uniform`): a hash of
        [rows, vocabulary] int64 words per decode step, which real shadows would compute on
        the CPU thousands of times, only for `.float()` to drop the values."""

        def run(*args, **kwargs):
            self._opaque += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._opaque -= 1

        return run

    def value(self, t):
        """The real value of `t`: itself if real, its shadow if fake and known, else None."""
        if not isinstance(t, FakeTensor):
            return t
        s = self._shadow.get(t)
        if s is None or s.untyped_storage().data_ptr() in self._stale:
            return None
        return s

    def _zeros_allowed(self, t) -> bool:
        return (isinstance(t, FakeTensor) and t.dtype in _ZERO_DTYPES
                and t.numel() <= self.zero_limit)

    def _values(self, flat: list) -> list | None:
        """Real values of `flat`'s tensors (zeros where allowed), or None if one is unknown."""
        reals = [self.value(x) if isinstance(x, torch.Tensor) else x for x in flat]
        missing = [i for i, (x, r) in enumerate(zip(flat, reals, strict=False))
                   if isinstance(x, torch.Tensor) and r is None]
        if not all(self._zeros_allowed(flat[i]) for i in missing):
            return None
        with unset_fake_temporarily():
            for i in missing:
                z = torch.zeros(flat[i].shape, dtype=flat[i].dtype)
                self._remember(flat[i], z)
                reals[i] = z
        return reals

    def _float_data_as_zeros(self, flat: list) -> list | None:
        """`flat` with known values, float tensors without one as zeros (their values do
        not shape a `_SHAPE_FROM_INDEX` op's output); None if an index is unknown."""
        reals = []
        for x in flat:
            r = self.value(x) if isinstance(x, torch.Tensor) else x
            if r is None and x.dtype.is_floating_point and x.dtype != torch.float64:
                with unset_fake_temporarily():
                    r = torch.zeros(x.shape, dtype=x.dtype)
            if r is None:
                return None
            reals.append(r)
        return reals

    def remember(self, fake, real) -> None:
        """Give fake tensor `fake` the host value `real` (same shape and dtype, on the CPU):
        a rule's answer for a model-derived value (`simulated_moe.routing_rule`)."""
        if fake.shape != real.shape or fake.dtype != real.dtype:
            raise ValueError(f"shadow {real.dtype} {list(real.shape)} for a fake "
                             f"{fake.dtype} {list(fake.shape)}")
        self._remember(fake, real)

    def _remember(self, fake, real) -> None:
        self._stale.discard(real.untyped_storage().data_ptr())
        self._shadow[fake] = real

    def _forget_mutated(self, func, args) -> None:
        for i in _mutated_args(func):
            if i < len(args) and isinstance(args[i], FakeTensor):
                s = self._shadow.get(args[i])
                if s is not None:
                    self._stale.add(s.untyped_storage().data_ptr())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = pytree.tree_flatten((args, kwargs))
        fakes = [x for x in flat if isinstance(x, FakeTensor)]
        if func is aten._local_scalar_dense.default and fakes:
            real = self.value(args[0])  # a read itself never assumes zeros
            if real is not None:
                with unset_fake_temporarily():
                    return real.item()
            return self.oracle.answer(args[0], caller_site())
        if func is aten.equal.default and fakes:  # a host bool (FakeTensorMode has none)
            reals = self._values(flat)
            if reals is not None:
                with unset_fake_temporarily():
                    return func(*reals)
            raise SimulationError(describe_op_error(
                func, flat, UnknownValue("its result depends on model outputs")))
        if not fakes and _host_device(kwargs.get("device")):
            with unset_fake_temporarily():
                return func(*args, **kwargs)  # host code: real values on the CPU
        dynamic = False
        try:
            out = func(*args, **kwargs)
        except DynamicOutputShapeException:
            out, dynamic = None, True
        except (RuntimeError, TypeError, ValueError) as e:
            raise SimulationError(describe_op_error(func, flat, e)) from None
        if func.namespace in ("c10d", "_c10d_functional") or (not dynamic and (
                self._opaque or _numel(out) > self.limit or not _has_value_dtype(out))):
            self._forget_mutated(func, args)  # a collective's result: not known here
            if self.collectives is not None and func.namespace in ("c10d", "_c10d_functional"):
                for fake, real in self.collectives(func, args, out, self.value):
                    self._remember(fake, real)
            return out
        reals = self._values(flat)
        stand_in = False
        if reals is None and dynamic and func in _SHAPE_FROM_INDEX:
            reals, stand_in = self._float_data_as_zeros(flat), True
        if reals is None or sum(_numel(r) for r in reals) > self.limit:
            if dynamic:
                raise SimulationError(describe_op_error(
                    func, flat, UnknownValue("its output shape depends on model outputs")))
            self._forget_mutated(func, args)
            return out
        rargs, rkwargs = pytree.tree_unflatten(reals, spec)
        if "device" in rkwargs:
            rkwargs["device"] = torch.device("cpu")
        try:
            with unset_fake_temporarily():
                rout = func(*rargs, **rkwargs)
                if func in _EMPTY:
                    rout.zero_()
        except Exception:  # noqa: BLE001 the fake op is the check; the value is a bonus
            if dynamic:
                raise
            self._forget_mutated(func, args)
            return out
        if dynamic:  # value-dependent shape: fakes shaped like the real result
            device = fakes[0].device
            out = pytree.tree_map_only(
                torch.Tensor, lambda r: torch.empty_strided(r.shape, r.stride(), dtype=r.dtype,
                                                            device=device), rout)
        if stand_in:  # the values are the zeros', only the shape is the real one
            return out
        for f, r in zip(pytree.tree_leaves(out), pytree.tree_leaves(rout), strict=False):
            # (a CPU kernel may shape an auxiliary output differently from the CUDA one)
            if (isinstance(f, FakeTensor) and isinstance(r, torch.Tensor)
                    and f.shape == r.shape and f.dtype == r.dtype):
                self._remember(f, r)
        return out
