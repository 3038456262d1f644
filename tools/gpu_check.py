"""GPU check: the real path on one CUDA GPU, compared with CPU fp32 references, in < 5 minutes.

    bash tools/gpu_check.sh                          # the lent machine (docs/gpu/README.md)
    python tools/gpu_check.py --device cpu --dry-run --out /tmp/gc     # the same, on CPU
    python tools/gpu_check.py --write-references     # remake docs/gpu/reference/ (CPU fp32)

Stages, in this order, each a subprocess of this interpreter killed (its process group) at
its own cap (`CAPS`, also bounded by what is left of `--budget-s`):

- `preflight`: CUDA, the imports, a torch.compile smoke test (gpu_check_preflight.py);
  when it fails, no other stage runs.
- `kernels`: mamba-ssm's Triton kernels against the torch ops, forward and backward
  (gpu_check_kernels.py); fails on an error over its tolerance.
- `fp32_dense`, `fp32_hybrid`: one RLP step of the tiny configs in fp32 (gpu_check_step.py
  record); fails where a row differs from docs/gpu/reference/ (gpu_check_compare.py).
- `bf16_dense`, `bf16_hybrid`: 3 steps in bf16; fails on a skipped step or a non-finite metric.
- `packed_attention`: one packed update, FlexAttention against the explicit mask
  (bench_packed_attention.py); fails when loss or gradients are apart.
- `qwen3_shape`: one timed RLP step of a Qwen3-1.7B-shaped model (gpu_check_step.py
  measure); fails only when it does not run (its figures are measurements).

Outputs (at most 3 files, under `--out`, default $OUT): `gpu_check.json` (every stage's
result, its failures, what ran: spec, kernels, attention path; the decode roofline and MFU),
`gpu_check_logs.txt` (every stage's log, the last 200 kB of each). Work files go to `--work`.

The `--dry-run` runs every stage on CPU with CPU standing in for CUDA: the fp32 stages at the
references' own shape (so the comparison is the one the GPU faces), bf16 stages at 2 steps,
the kernels under TRITON_INTERPRET=1 at a smaller shape, the attention and Qwen3 stages tiny.

Roofline and MFU (qwen3_shape), from the step's computed work (gpu_check_step.py:
computed_update_work): decode tokens/s (decoded thought tokens / rollout seconds) against a
full-batch decode step's max(bytes / HBM bandwidth, FLOPs / peak), bytes = bf16 weights +
each row's K/V; update MFU = 3 x forward FLOPs / update seconds / peak, forward = 2 x matmul
params x tokens the update computed (shared windows once, then each branch) + 2 x output
params x thought positions + 4 x attention width x computed (query, key) pairs per attention
layer. Masked pairs, padding and the Mamba scans are not counted. `--hbm-tbps` and
`--peak-tflops` default to the H100 SXM (3.35 TB/s; ~790 TFLOP/s bf16 dense as measured on
this workplace's H100s, the data sheet says 989); the JSON records which were used.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check_compare as cmp  # noqa: E402

TINY = {"dense": "examples/configs/tiny_cpu.yaml",
        "hybrid": "examples/configs/tiny_hybrid_cpu.yaml"}
QWEN3 = "examples/configs/qwen3_1p7b.yaml"
BPE = "tests/assets/tiny_bpe/tokenizer.json"
REFERENCES = ROOT / "docs/gpu/reference"
# The fp32 comparison's shape, the same on the GPU and in the references (16 rows of 16 tokens).
FP32_SHAPE = ("rlp.contexts_per_step=4", "train.seed=1234", "train.progress=false")
BF16_STEPS = 3
STAGES = ("preflight", "kernels", "fp32_dense", "fp32_hybrid", "bf16_dense", "bf16_hybrid",
          "packed_attention", "qwen3_shape")
CAPS = {"preflight": 60, "kernels": 75, "fp32_dense": 60, "fp32_hybrid": 60, "bf16_dense": 45,
        "bf16_hybrid": 45, "packed_attention": 45, "qwen3_shape": 90}
DRY_CAPS = {k: 900 for k in STAGES}  # CPU: the interpreter and compile take minutes
LOG_TAIL = 200_000
DRY_QWEN3 = ("model.hybrid_layer_pattern=*-", "model.hidden_size=64", "model.ffn_hidden_size=192",
             "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=16",
             "model.make_vocab_size_divisible_by=1024", "model.max_sequence_length=256")


class Budget:
    """Wall-clock budget over all stages."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def run_child(args: list[str], cap: float, log: Path, env: dict | None = None
              ) -> tuple[int, float]:
    """Run `python ARGS` from the repository root in its own process group, stdout+stderr to
    `log`; at `cap` seconds the whole group (compile workers included) is killed.
    Returns (exit code, seconds); 124 when it was killed at its cap."""
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(cap, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
            out.write(f"\n[gpu_check] killed at its cap of {cap:.0f} s\n")
    return rc, time.monotonic() - start


class Check:
    """The stages of one run: caps, logs, results; `report` is the JSON."""

    def __init__(self, args):
        self.args, self.work = args, Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.budget = Budget(args.budget_s)
        self.caps = {**(DRY_CAPS if args.dry_run else CAPS), **args.cap}
        self.report: dict = {"args": {k: v for k, v in vars(args).items()}, "stages": {}}
        self.interp = {"TRITON_INTERPRET": "1"} if args.device == "cpu" else {}

    def child(self, name: str, argv: list[str], env: dict | None = None) -> dict:
        cap = min(self.caps[name], max(self.budget.left(), 0))
        if cap < 1:
            return {"ok": False, "failures": [f"{name}: not run, the {self.args.budget_s:.0f} s "
                                              "budget is spent"]}
        rc, seconds = run_child(argv, cap, self.work / f"{name}.log", env)
        stage = {"rc": rc, "seconds": round(seconds, 2), "cap_s": cap, "failures": []}
        if rc == 124:
            stage["failures"].append(f"{name}: killed at its cap of {cap:.0f} s")
        elif rc != 0:
            stage["failures"].append(f"{name}: exit code {rc} (see gpu_check_logs.txt)")
        return stage

    def device_overrides(self, dtype: str) -> list[str]:
        return [f"device.type={self.args.device}", f"precision.params_dtype={dtype}"]

    def preflight(self) -> dict:
        out = self.work / "preflight.json"
        stage = self.child("preflight", ["tools/gpu_check_preflight.py", "--device",
                                         self.args.device, "--out", str(out)], self.interp)
        return self._merge(stage, out)

    def kernels(self) -> dict:
        out = self.work / "kernels.json"
        argv = ["tools/gpu_check_kernels.py", "--device", self.args.device, "--out", str(out)]
        stage = self.child("kernels", argv + (["--small"] if self.args.dry_run else []),
                           self.interp)
        return self._merge(stage, out)

    def fp32(self, name: str) -> dict:
        ref_file = Path(self.args.references) / f"tiny_{name}_fp32.json"
        out = self.work / f"fp32_{name}.json"
        stage = self.child(f"fp32_{name}", [
            "tools/gpu_check_step.py", "record", "--config", TINY[name], "--steps", "1",
            "--out", str(out), *FP32_SHAPE, *self.device_overrides("fp32")])
        if not ref_file.is_file():
            stage["failures"].append(f"fp32_{name}: no reference {ref_file} "
                                     "(python tools/gpu_check.py --write-references)")
        elif out.is_file() and not stage["failures"]:
            got, ref = json.loads(out.read_text()), json.loads(ref_file.read_text())
            stage["run"], stage["step1"] = got["run"], got["steps"][0]
            stage["reference"] = {"file": str(ref_file),
                                  "made_with": ref["reference"]["made_with"]}
            stage["failures"] += cmp.compare_record(f"fp32_{name}", got, ref)
        return stage

    def bf16(self, name: str) -> dict:
        steps = 2 if self.args.dry_run else BF16_STEPS
        out = self.work / f"bf16_{name}.json"
        stage = self.child(f"bf16_{name}", [
            "tools/gpu_check_step.py", "record", "--config", TINY[name], "--steps", str(steps),
            "--out", str(out), "train.progress=false", f"train.seed={self.args.seed}",
            *self.device_overrides("bf16")])
        if out.is_file() and not stage["failures"]:
            got = json.loads(out.read_text())
            stage["run"], stage["steps"] = got["run"], got["steps"]
            stage["failures"] += cmp.check_steps(f"bf16_{name}", got["steps"], steps)
        return stage

    def packed_attention(self) -> dict:
        shape = ["--docs", "4", "--positions", "8", "--group", "8", "--window", "1024",
                 "--thought", "64", "--repeats", "3"]
        if self.args.dry_run:
            shape = ["--docs", "1", "--positions", "2", "--group", "2", "--window", "32",
                     "--thought", "4", "--repeats", "1", "--block-size", "16"]
        out = self.work / "packed_attention.json"
        out.unlink(missing_ok=True)
        stage = self.child("packed_attention", [
            "tools/bench_packed_attention.py", "--config", TINY["dense"], *shape, "--out",
            str(out), *self.device_overrides("bf16"), f"train.seed={self.args.seed}"])
        if out.is_file() and not stage["failures"]:
            bench = json.loads(out.read_text())
            stage.update({k: bench[k] for k in ("sparsity", "seconds", "speedup_flex_vs_mask",
                                                "loss", "loss_abs_diff", "grad_max_abs_diff",
                                                "grad_max_abs")})
            stage["failures"] += cmp.check_flex_vs_mask(bench, "bf16")
        return stage

    def qwen3_shape(self) -> dict:
        from gpu_check_roofline import qwen3_overrides, summarize

        overrides = qwen3_overrides(self.args, DRY_QWEN3 if self.args.dry_run else (), BPE)
        out = self.work / "qwen3_shape.json"
        stage = self.child("qwen3_shape", ["tools/gpu_check_step.py", "measure", "--config",
                                           QWEN3, "--out", str(out), *overrides])
        if out.is_file() and not stage["failures"]:
            stage.update(summarize(json.loads(out.read_text()), QWEN3, overrides, BPE,
                                   self.args.hbm_tbps, self.args.peak_tflops))
        return stage

    @staticmethod
    def _merge(stage: dict, out: Path) -> dict:
        if out.is_file():
            result = json.loads(out.read_text())
            stage["failures"] = [f for f in stage["failures"] if "exit code" not in f]
            stage["failures"] += result.pop("failures", [])
            stage.update({k: v for k, v in result.items() if k != "ok"})
        return stage

    def run(self) -> dict:
        plan = {"preflight": self.preflight, "kernels": self.kernels,
                "packed_attention": self.packed_attention, "qwen3_shape": self.qwen3_shape,
                **{f"fp32_{n}": partial(self.fp32, n) for n in TINY},
                **{f"bf16_{n}": partial(self.bf16, n) for n in TINY}}
        for name in self.args.stages:
            stage = plan[name]()
            stage["ok"] = not stage["failures"]
            self.report["stages"][name] = stage
            state = "ok" if stage["ok"] else "FAILED"
            print(f"[gpu_check] {name}: {state} ({stage.get('seconds', 0):.0f} s)", flush=True)
            for line in stage["failures"]:
                print(f"[gpu_check]   {line}", flush=True)
            if name == "preflight" and not stage["ok"]:
                print("[gpu_check] preflight failed: the other stages are not run", flush=True)
                break
        r = self.report
        r["elapsed_s"] = round(self.budget.elapsed(), 1)
        r["within_budget"] = self.budget.elapsed() <= self.args.budget_s
        r["failures"] = [f for s in r["stages"].values() for f in s["failures"]]
        r["ok"] = (r["within_budget"] and not r["failures"]
                   and set(r["stages"]) == set(self.args.stages))
        return r

    def pack(self, out: Path) -> list[Path]:
        """The outputs as <= 3 files: the JSON report and one text file of every log."""
        out.mkdir(parents=True, exist_ok=True)
        files = [out / "gpu_check.json", out / "gpu_check_logs.txt"]
        files[0].write_text(json.dumps(self.report, indent=1) + "\n")
        with open(files[1], "w") as logs:
            for name in self.report["stages"]:
                log = self.work / f"{name}.log"
                text = log.read_text(errors="replace") if log.is_file() else "(no log)\n"
                cut = len(text) > LOG_TAIL
                logs.write(f"===== {name}{' (last 200 kB)' if cut else ''} =====\n")
                logs.write(text[-LOG_TAIL:] + "\n")
        return files


def write_references(args) -> int:
    """Run the fp32 stages on CPU and store their JSON as docs/gpu/reference/*.json."""
    references = Path(args.references)
    references.mkdir(parents=True, exist_ok=True)
    for name, config in TINY.items():
        target = references / f"tiny_{name}_fp32.json"
        rc, seconds = run_child(["tools/gpu_check_step.py", "record", "--config", config,
                                 "--steps", "1", "--write-reference", "--out", str(target),
                                 *FP32_SHAPE, "device.type=cpu", "precision.params_dtype=fp32"],
                                args.budget_s, Path(args.work) / f"reference_{name}.log")
        print(f"[gpu_check] reference {target}: rc {rc} ({seconds:.0f} s)")
        if rc != 0:
            return rc
    return 0


def _cap(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in STAGES or not seconds:
        raise argparse.ArgumentTypeError(f"{text!r} (allowed: STAGE=SECONDS, STAGE in {STAGES})")
    return name, float(seconds)


def parse(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    p.add_argument("--work", default=None, help="stage files and logs (default OUT/../work)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dry-run", action="store_true", help="every stage small, on --device cpu")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--cap", nargs="*", type=_cap, default=[], metavar="STAGE=SECONDS")
    p.add_argument("--budget-s", type=float, default=285.0, help="all stages together")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--contexts", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--thought-tokens", type=int, default=512)
    p.add_argument("--prefix-tokens", type=int, default=512, help="max prefix (min: half)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--hbm-tbps", type=float, default=3.35)
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--references", default=str(REFERENCES),
                   help="folder of the CPU fp32 references (default docs/gpu/reference)")
    p.add_argument("--write-references", action="store_true",
                   help="compute them here on CPU in fp32 and write them to --references")
    args = p.parse_args(argv)
    args.cap = dict(args.cap)
    args.work = args.work or str(Path(args.out).resolve().parent / "gpu_check_work")
    if args.dry_run:
        args.device, args.budget_s = "cpu", max(args.budget_s, 3600.0)
        args.contexts, args.group, args.thought_tokens, args.prefix_tokens = 4, 2, 8, 32
        args.micro_batch = 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.write_references:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        args.budget_s = max(args.budget_s, 1800.0)
        return write_references(args)
    check = Check(args)
    report = check.run()
    files = check.pack(Path(args.out))
    q = report["stages"].get("qwen3_shape", {})
    if q.get("ok"):
        print(f"[gpu_check] decode {q['decode_tokens_per_s']:.0f} tok/s "
              f"({100 * q['decode_fraction_of_roofline']:.1f}% of roofline) | update "
              f"{q['update_tokens_per_s']:.0f} tok/s, MFU {100 * q['update_mfu']:.1f}% | peak "
              f"{q['peak_memory_gib']:.1f} GiB", flush=True)
    print(f"[gpu_check] {'PASSED' if report['ok'] else 'FAILED'} in {report['elapsed_s']:.0f} s;"
          f" {', '.join(str(f) for f in files)}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
