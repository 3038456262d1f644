"""Kernel parity stage of tools/gpu_check.py: mamba-ssm's Triton kernels against the
project's torch ops (megatron_rlp.models.mamba.ops), forward and backward, on one device.

    python tools/gpu_check_kernels.py --device cuda --out kernels.json
    TRITON_INTERPRET=1 python tools/gpu_check_kernels.py --device cpu --out k.json  # dry run

At the tiny hybrid's Mamba shapes (16 heads x 32, state 32, 2 groups; batch 2, 96 tokens,
chunk 32), fp32, with Triton's fp32 dots in IEEE mode (`TRITON_F32_DEFAULT=ieee`: the check
is about layouts and recurrences, so TF32's 10-bit rounding is kept out of the tolerance):

- `ssd_combined.mamba_chunk_scan_combined` with `initial_states` and `return_final_states`
  (as forked branches call it): output, final states; grads of x, dt, A, B, C, D, z, dt_bias
  and initial_states;
- `selective_state_update.selective_state_update` (decode): output and the state it updates
  in place;
- `layernorm_gated.rmsnorm_fn` (gated RMSNorm, 2 groups, gate after the norm): output; grads
  of x, weight and z.

`causal_conv1d` is a CUDA extension this machine does not have; the mixer then takes its
`F.conv1d` path (nothing to compare). Error = max |triton - torch| / max |torch| per tensor.

Loading: the carried mamba-ssm wheel is built without its CUDA extension, and its package
`__init__` imports that extension (`selective_scan_cuda`), so `import mamba_ssm` fails.
`load_triton_kernels` registers the package as a bare module with the installed path
(its `__init__` not run) and imports the three Triton modules, which need no extension.
On CPU (`--device cpu`, under `TRITON_INTERPRET=1`) three more stand-ins are needed: the
kernels enter `torch.cuda.device(index)` and read the SM count from `torch.cuda`, and the
autotuner benchmarks its configs through a GPU driver (the first config is taken). These are
replaced for this process only; on a GPU nothing is replaced but the package `__init__`.
(The test suite's own interpreter shims belong to tests/kernels/, issue 22; this tool does
not import the tests.)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHAPE = dict(batch=2, length=96, heads=16, headdim=32, state=32, groups=2, chunk=32)
SMALL = dict(batch=1, length=48, heads=4, headdim=16, state=16, groups=2, chunk=16)  # --small
TOLERANCE = {"forward": 1e-4, "backward": 1e-3}  # relative to the torch tensor's max |.|


def load_triton_kernels(device: str) -> dict:
    """{name: function} of the three Triton kernels, importable without the CUDA extension."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mamba_ssm is not installed (wheels/mamba_ssm-2.3.2.post1-*.whl)")
    if "mamba_ssm" not in sys.modules:
        bare = types.ModuleType("mamba_ssm")
        bare.__path__ = list(spec.submodule_search_locations)
        bare.__spec__ = spec
        sys.modules["mamba_ssm"] = bare
    if device == "cpu":
        _interpreter_stand_ins()
    ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    norm = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
    return {"mamba_chunk_scan_combined": ssd.mamba_chunk_scan_combined,
            "selective_state_update": ssu.selective_state_update,
            "rmsnorm_fn": norm.rmsnorm_fn}


def _interpreter_stand_ins() -> None:
    """CPU only: `torch.cuda.device(i)` becomes a no-op context and the SM count a constant."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("--device cpu runs the Triton kernels under TRITON_INTERPRET=1 only")
    from triton.runtime import autotuner

    torch.cuda.device = lambda index: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(
        multi_processor_count=4, name="cpu (Triton interpreter)")
    run = autotuner.Autotuner.run

    def first_config(self, *args, **kwargs):  # benchmarking needs a GPU driver
        self.configs = self.configs[:1]
        return run(self, *args, **kwargs)

    autotuner.Autotuner.run = first_config


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (float64); inf when shapes differ or got is not finite."""
    if got.shape != want.shape or not bool(torch.isfinite(got).all()):
        return float("inf")
    scale = max(float(want.abs().max()), 1e-12)
    return float((got.double() - want.double()).abs().max()) / scale


def _leaves(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}


def chunk_scan_case(triton_fn, device: str, gen: torch.Generator) -> dict[str, float]:
    from megatron_rlp.models.mamba import ops

    s = SHAPE
    b, length, h, p, n, g = s["batch"], s["length"], s["heads"], s["headdim"], s["state"], \
        s["groups"]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    inputs = dict(x=rnd(b, length, h, p), dt=rnd(b, length, h, scale=0.5),
                  A=-torch.rand(h, generator=gen).to(device) * 4 - 0.5,
                  B=rnd(b, length, g, n, scale=0.5), C=rnd(b, length, g, n, scale=0.5),
                  D=rnd(h), z=rnd(b, length, h, p), dt_bias=rnd(h, scale=0.5),
                  initial_states=rnd(b, h, p, n, scale=0.5))
    dout, dfinal = rnd(b, length, h, p), rnd(b, h, p, n)
    results = {}
    for name, fn in (("triton", triton_fn), ("torch", ops.mamba_chunk_scan_combined)):
        t = _leaves(inputs)
        out, final = fn(t["x"], t["dt"], t["A"], t["B"], t["C"], s["chunk"], D=t["D"],
                        z=t["z"], dt_bias=t["dt_bias"], initial_states=t["initial_states"],
                        dt_softplus=True, return_final_states=True)
        torch.autograd.backward([out, final], [dout, dfinal])
        results[name] = {"out": out.detach(), "final_states": final.detach(),
                         **{f"grad_{k}": v.grad for k, v in t.items()}}
    return {k: rel_error(results["triton"][k], v) for k, v in results["torch"].items()}


def state_update_case(triton_fn, device: str, gen: torch.Generator) -> dict[str, float]:
    from megatron_rlp.models.mamba import ops

    s = SHAPE
    b, h, p, n, g = s["batch"], s["heads"], s["headdim"], s["state"], s["groups"]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    # Megatron's decode layout: per-head scalars broadcast over headdim / state (stride 0).
    dt = rnd(b, h, scale=0.5)[:, :, None].expand(b, h, p)
    a = (-torch.rand(h, generator=gen) * 4 - 0.5).to(device)[:, None, None].expand(h, p, n)
    args = dict(x=rnd(b, h, p), dt=dt, A=a, B=rnd(b, g, n, scale=0.5),
                C=rnd(b, g, n, scale=0.5), D=rnd(h)[:, None].expand(h, p), z=rnd(b, h, p),
                dt_bias=rnd(h, scale=0.5)[:, None].expand(h, p))
    state0 = rnd(b, h, p, n, scale=0.5)
    results = {}
    for name, fn in (("triton", triton_fn), ("torch", ops.selective_state_update)):
        state = state0.clone()
        out = fn(state, **args, dt_softplus=True)
        results[name] = {"out": out, "state": state}
    return {k: rel_error(results["triton"][k], v) for k, v in results["torch"].items()}


def rmsnorm_case(triton_fn, device: str, gen: torch.Generator) -> dict[str, float]:
    from megatron_rlp.models.mamba import ops

    d = SHAPE["heads"] * SHAPE["headdim"]
    rows = SHAPE["batch"] * SHAPE["length"]
    inputs = {k: torch.randn(*shape, generator=gen).to(device)
              for k, shape in (("x", (rows, d)), ("weight", (d,)), ("z", (rows, d)))}
    dout = torch.randn(rows, d, generator=gen).to(device)
    results = {}
    for name, fn in (("triton", triton_fn), ("torch", ops.rmsnorm_fn)):
        t = _leaves(inputs)
        out = fn(t["x"], t["weight"], None, z=t["z"], eps=1e-5, group_size=d // SHAPE["groups"],
                 norm_before_gate=False)
        out.backward(dout)
        results[name] = {"out": out.detach(), **{f"grad_{k}": v.grad for k, v in t.items()}}
    return {k: rel_error(results["triton"][k], v) for k, v in results["torch"].items()}


def run(device: str, small: bool = False) -> dict:
    """Every case; `ok` when each error is within TOLERANCE (forward: outputs and states).
    `small`: the SMALL shape (the CPU dry run, where the interpreter runs every program)."""
    if small:
        SHAPE.update(SMALL)
    kernels = load_triton_kernels(device)
    gen = torch.Generator().manual_seed(0)
    cases = {"mamba_chunk_scan_combined": chunk_scan_case, "selective_state_update":
             state_update_case, "rmsnorm_fn": rmsnorm_case}
    report: dict = {"device": device, "shape": SHAPE, "tolerance": TOLERANCE,
                    "triton_f32": os.environ.get("TRITON_F32_DEFAULT"),
                    "interpreter": os.environ.get("TRITON_INTERPRET") == "1", "cases": {},
                    "not_run": {"causal_conv1d": "CUDA extension absent on the lent machine"}}
    for name, case in cases.items():
        errors = case(kernels[name], device, gen)
        failed = [f"{name} {k}: rel error {e:.2e} > "
                  f"{TOLERANCE['backward' if k.startswith('grad_') else 'forward']:.0e}"
                  for k, e in errors.items()
                  if not e <= TOLERANCE["backward" if k.startswith("grad_") else "forward"]]
        report["cases"][name] = {"errors": errors, "failures": failed}
    report["failures"] = [f for c in report["cases"].values() for f in c["failures"]]
    report["ok"] = not report["failures"]
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="the dry run's smaller shape")
    args = p.parse_args(argv)
    report = run(args.device, args.small)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for line in report["failures"]:
        print(f"[kernels] FAILED {line}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
