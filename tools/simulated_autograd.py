"""A backward pass for fake CUDA tensors without a driver, for `tools/simulate_gpu.py`.

PyTorch's autograd engine (C++) stashes the current CUDA stream of every device before it runs
a graph with CUDA nodes (`GraphTask::stash_current_streams`, called from
`Engine::compute_dependencies`), and asks the driver whether device 0 has a primary context:
without a driver that fails ("hasPrimaryContext expects a valid device index"), for fake
tensors too (torch's own fake mode creates a real CUDA tensor first for this reason,
`fake_tensor.init_gpu_context`). Compiled autograd is entered after the same call.

`PythonEngine` stands in for `Variable._execution_engine` while the simulation runs. It does
what the C++ engine does for a graph on one device, in Python: count each node's
dependencies from the roots, call every node (`node(*grads)`, the same C++ or Python backward
the engine would call) once all its gradients have arrived, sum gradients that meet at a node,
accumulate leaf gradients through their `AccumulateGrad` node, and run the hooks Megatron's
DDP and PyTorch put there (`post_accumulate_grad` hooks registered on the parameter, and the
DDP post-hook on the grad accumulator, which Megatron's DDP keeps in `grad_accs`).

Why it keeps the device checks: every backward kernel is still dispatched through
`FakeTensorMode`, which refuses an op that mixes a CPU and a CUDA tensor, and the grads each
node returns are checked here against the device and dtype its input had in the forward (what
the C++ engine's `validate_outputs` checks). Only the stream bookkeeping is gone (there are
no streams on a fake device). A node's saved tensors are let go of once it has run, as the
C++ engine's `release_variables` does: there is no Python API for that, so the forward runs
under `PythonEngine.saved()` (saved-tensor hooks that keep each saved tensor in a holder the
engine empties). Without it, a graph that anything still references (a metric, a schedule's
output list) kept every micro-batch's activations alive: 47 GiB per Qwen3 micro-batch.
"""

from __future__ import annotations

import collections

import torch


class PythonEngine:
    """The `run_backward` / `queue_callback` interface of `torch._C._ImperativeEngine`.

    Args:
        grad_acc_hooks: AccumulateGrad node -> hooks to call after it ran (Megatron DDP's
            post-hooks, found in `DistributedDataParallel.grad_accs`; see `ddp_hooks`).
    """

    def __init__(self, grad_acc_hooks: dict | None = None):
        self.grad_acc_hooks = grad_acc_hooks or {}
        self._callbacks: list = []
        self._unpacked: list | None = None  # holders a running node unpacked (`saved`)

    def saved(self):
        """`torch.autograd.graph.saved_tensors_hooks` to enter around the forward: each saved
        tensor is kept in a holder, and once the node that unpacked it has run (without
        `retain_graph`), the holder lets go of it, as the C++ engine's `release_variables`
        does. Without it a graph's activations live as long as any Python reference to the
        graph, which the C++ engine does not wait for."""

        def pack(t):
            return [t]

        def unpack(holder):
            if not holder:
                raise RuntimeError("a saved tensor was used after its node ran (retain_graph?)")
            if self._unpacked is not None:
                self._unpacked.append(holder)
            return holder[0]

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def queue_callback(self, callback) -> None:
        self._callbacks.append(callback)

    def is_checkpoint_valid(self) -> bool:
        return True

    def run_backward(self, tensors, grad_tensors, keep_graph=False, create_graph=False,
                     inputs=(), allow_unreachable=False, accumulate_grad=True):
        roots = []
        for t, g in zip(tensors, grad_tensors, strict=False):
            if g is None:
                g = torch.ones_like(t)
            edge = torch.autograd.graph.get_gradient_edge(t)
            roots.append(((edge.node, edge.output_nr), g))
        wanted = {}
        for i, t in enumerate(inputs or ()):
            edge = torch.autograd.graph.get_gradient_edge(t)
            wanted[(edge.node, edge.output_nr)] = i
        captured: list = [None] * len(inputs or ())
        buffers: dict = {}
        for (node, nr), g in roots:
            _add(buffers, node, nr, g)
        deps = _dependencies([node for (node, _), _ in roots])
        ready = list({id(n): n for n in buffers if n is not None and deps[n] == 0}.values())
        while ready:
            node = ready.pop()
            grads = buffers.pop(node, {})
            for (n, nr), i in wanted.items():
                if n is node and nr in grads:
                    captured[i] = grads[nr]
            stop = not accumulate_grad and any(n is node for n, _ in wanted)
            if grads and not stop:
                self._unpacked = [] if not keep_graph else None
                try:
                    # as the C++ engine: the backward is recorded only with create_graph
                    with torch.set_grad_enabled(create_graph):
                        self._run(node, grads, buffers, accumulate_grad)
                except RuntimeError as e:  # name the backward node beside the op
                    raise type(e)(f"{e} (in the backward of {node.name()})") from None
                for holder in self._unpacked or ():  # the node's saved tensors die (saved)
                    holder.clear()
                self._unpacked = None
            del grads  # a node's incoming gradients die once it has run, as in the engine
            for child, _ in node.next_functions:
                if child is None:
                    continue
                deps[child] -= 1
                if deps[child] == 0:
                    ready.append(child)
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()
        return tuple(captured)

    def _run(self, node, grads: dict, buffers: dict, accumulate_grad: bool) -> None:
        name = type(node).__name__
        if name == "AccumulateGrad":
            if not accumulate_grad:
                return
            param = node.variable
            grad = grads.get(0)
            if grad is None:
                return
            _check(grad, param, node)
            node(grad)
            for hook in getattr(param, "_post_accumulate_grad_hooks", None) or {}:
                param._post_accumulate_grad_hooks[hook](param)
            for hook in self.grad_acc_hooks.get(node, ()):
                hook()
            return
        n_in = max(len(getattr(node, "_input_metadata", ())), max(grads) + 1)
        args = [grads.get(i) for i in range(n_in)]  # None: no gradient (undefined)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            outs = node.apply(*args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            # The user's backward returns one grad per forward argument; the graph's edges
            # are the tensor arguments, and exactly those needing a grad have a node.
            outs = [g for g, need in zip(outs, node.needs_input_grad, strict=False) if need]
            edges = [e for e in node.next_functions if e[0] is not None]
        else:
            outs = node(*args)
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            edges = list(node.next_functions)
        for (child, nr), g in zip(edges, outs, strict=False):
            if child is not None and g is not None:
                _add(buffers, child, nr, _validated(g, child, nr, node))


def _validated(grad: torch.Tensor, child, nr: int, producer) -> torch.Tensor:
    """The C++ engine's `validate_outputs` for one edge: the gradient must sit on the device
    its tensor had in the forward (else an error), and is cast to that tensor's dtype and
    summed to its shape where it was broadcast."""
    metas = getattr(child, "_input_metadata", None)
    if not metas or nr >= len(metas):
        return grad
    meta = metas[nr]
    if grad.device != meta.device:
        raise RuntimeError(f"{type(producer).__name__} returned a gradient on {grad.device} "
                           f"for a tensor on {meta.device} {list(meta.shape)}")
    if tuple(grad.shape) != tuple(meta.shape):
        grad = grad.sum_to_size(tuple(meta.shape))
    if grad.dtype != meta.dtype:
        grad = grad.to(meta.dtype)
    return grad


def _check(grad: torch.Tensor, like: torch.Tensor, node) -> None:
    """The engine's `validate_outputs`: a gradient lives where its tensor lives."""
    if grad.device != like.device:
        raise RuntimeError(f"{type(node).__name__}: gradient on {grad.device} for a tensor on "
                           f"{like.device} {list(like.shape)}")


def _add(buffers: dict, node, nr: int, grad) -> None:
    slot = buffers.setdefault(node, {})
    slot[nr] = grad if nr not in slot else slot[nr] + grad


def _dependencies(roots: list) -> collections.Counter:
    deps: collections.Counter = collections.Counter()
    seen, stack = set(), [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                deps[child] += 1
                stack.append(child)
    return deps


def ddp_hooks(model_chunks) -> dict:
    """AccumulateGrad node -> [Megatron DDP's post-hook] for every DDP-wrapped parameter."""
    hooks: dict = {}
    for ddp in model_chunks:
        params = [p for p in ddp.module.parameters() if p.requires_grad]
        for param, acc in zip(params, getattr(ddp, "grad_accs", []), strict=False):
            hooks.setdefault(acc, []).append(ddp._make_backward_post_hook(param))
    return hooks
