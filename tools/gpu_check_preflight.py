"""Preflight of tools/gpu_check.py: is this machine able to run the check at all?

    python tools/gpu_check_preflight.py --device cuda --out preflight.json

Checks, in order, each one line in `failures` when it does not hold:
- the device: CUDA available with one visible GPU (name, capability, memory recorded), or CPU
  for the dry run;
- the imports the stages need: megatron.core (0.19.2, from the carried wheel), megatron_rlp
  (from this checkout), transformers, einops, and mamba-ssm's Triton kernels
  (tools/gpu_check_kernels.load_triton_kernels);
- `torch.compile` (inductor) of a small function on the device equals eager within 1e-5,
  as the packed update's FlexAttention will be compiled.
The versions found (python, torch, CUDA, Triton, megatron-core, mamba-ssm) are recorded.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def preflight(device: str) -> dict:
    import torch

    fails: list[str] = []
    info: dict = {"python": platform.python_version(), "executable": sys.executable,
                  "torch": torch.__version__, "cuda": torch.version.cuda}
    if device == "cuda":
        if not torch.cuda.is_available():
            fails.append("device: torch.cuda.is_available() is False (no GPU or driver)")
        else:
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, capability=list(torch.cuda.get_device_capability()),
                        gpu_memory_gib=props.total_memory / 2**30,
                        gpu_count=torch.cuda.device_count())
    for module, dist in (("megatron.core", "megatron-core"), ("megatron_rlp", None),
                         ("transformers", "transformers"), ("einops", "einops"),
                         ("triton", "triton")):
        try:
            mod = __import__(module, fromlist=["_"])
            info[f"{module}_from"] = str(Path(mod.__file__).parent)
            if dist:
                info[dist] = _version(dist)
        except Exception as e:  # noqa: BLE001 - the line names whatever failed
            fails.append(f"import {module}: {type(e).__name__}: {e}")
    try:
        from gpu_check_kernels import load_triton_kernels

        info["mamba_ssm_triton_kernels"] = sorted(load_triton_kernels(device))
        info["mamba-ssm"] = _version("mamba-ssm")
    except Exception as e:  # noqa: BLE001
        fails.append(f"mamba-ssm Triton kernels: {type(e).__name__}: {e}")
    if not fails:
        fails += compile_smoke(device, info)
    return {"device": device, "machine": info, "failures": fails, "ok": not fails}


def compile_smoke(device: str, info: dict) -> list[str]:
    """torch.compile (inductor) of x -> softmax(x @ x^T) * sin(x) on the device vs eager."""
    import torch

    def f(x):
        return torch.softmax(x @ x.T, dim=-1) @ torch.sin(x)

    x = torch.randn(64, 32, device=device)
    start = time.perf_counter()
    try:
        got = torch.compile(f, fullgraph=True)(x)
    except Exception as e:  # noqa: BLE001
        return [f"torch.compile smoke test: {type(e).__name__}: {str(e).splitlines()[0]}"]
    info["compile_smoke_s"] = time.perf_counter() - start
    err = float((got - f(x)).abs().max())
    info["compile_smoke_max_abs_diff"] = err
    return [] if err <= 1e-5 else [f"torch.compile smoke test: compiled vs eager {err:.1e}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    report = preflight(args.device)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for line in report["failures"]:
        print(f"[preflight] FAILED {line}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
