"""GPU check: the real path on one CUDA GPU, compared with CPU fp32 references, in < 5 minutes.

    bash tools/gpu_check.sh                          # the lent machine (docs/gpu/README.md)
    python tools/gpu_check.py --device cpu --dry-run --out /tmp/gc     # the same, on CPU
    python tools/gpu_check.py --write-references     # remake docs/gpu/reference/ (CPU fp32)

Stages, each a subprocess of this interpreter killed (its process group) at its own cap
(`CAPS`, also bounded by what is left of `--budget-s`), in `GROUPS`: the preflight; then the
five decisive stages side by side (`--jobs`; small, and their compiles use the CPU cores);
then the two timed stages alone (the files of each stage: tools/gpu_check_stages.py):

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
`gpu_check_logs.txt` (every stage's log, the last 200 kB of each). Work files go to `--work`
(default: a new folder under the temp dir; the JSON names it).

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
`--peak-tflops` default to the card's (gpu_check_stages.PEAKS: H100 3.35 TB/s, H200 4.8;
~790 TFLOP/s bf16 dense as measured on this workplace's cards, the data sheets say 989);
the JSON records which were used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from gpu_check_stages import FP32_SHAPE, REFERENCES, TINY, Stages  # noqa: E402

STAGES = ("preflight", "kernels", "fp32_dense", "fp32_hybrid", "bf16_dense", "bf16_hybrid",
          "packed_attention", "qwen3_shape")
# Run in this order; the stages of one group run side by side (`--jobs`): the decisive ones
# are small and compile on the CPU cores, the timed ones run alone.
GROUPS = (("preflight",), ("kernels", "fp32_dense", "fp32_hybrid", "bf16_dense", "bf16_hybrid"),
          ("packed_attention",), ("qwen3_shape",))
CAPS = {"preflight": 60, "kernels": 150, "fp32_dense": 120, "fp32_hybrid": 120,
        "bf16_dense": 120, "bf16_hybrid": 120, "packed_attention": 75, "qwen3_shape": 120}
DRY_CAPS = dict.fromkeys(STAGES, 900)  # CPU: the interpreter and compiles take minutes
LOG_TAIL = 200_000


class Budget:
    """Wall-clock budget over all stages."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class Child:
    """`python ARGV` from the repository root in its own process group (so that compile
    workers die with it), stdout+stderr to `log`, killed at `cap` seconds from its start."""

    def __init__(self, argv: list[str], cap: float, log: Path, env: dict | None = None):
        self.argv, self.cap, self.log = argv, cap, log
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(
                        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.rc: int | None = None
        self.seconds = 0.0

    def start(self) -> None:
        self.out = open(self.log, "w")  # noqa: SIM115 - closed in poll()
        self.began = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, *self.argv], cwd=ROOT, env=self.env,
                                     stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def poll(self) -> bool:
        """True once finished (exit code in `rc`, 124 when killed at its cap)."""
        rc = self.proc.poll()
        self.seconds = time.monotonic() - self.began
        if rc is None and self.seconds <= self.cap:
            return False
        if rc is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            rc = 124
            self.out.write(f"\n[gpu_check] killed at its cap of {self.cap:.0f} s\n")
        else:
            with contextlib.suppress(ProcessLookupError):  # leftovers of a finished child
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.rc = rc
        self.out.close()
        return True


def run_children(children: list[Child], jobs: int = 1, stagger_s: float = 1.0) -> None:
    """Run `children`, at most `jobs` at a time, each to its end or its cap. Starts are
    `stagger_s` apart: each child's one-process group picks a free TCP port
    (megatron_rlp.distributed), and two picking in the same instant could pick the same."""
    pending, running, last = list(children), [], -math.inf
    while pending or running:
        if pending and len(running) < jobs and time.monotonic() - last >= stagger_s:
            child = pending.pop(0)
            child.start()
            running.append(child)
            last = time.monotonic()
        running = [c for c in running if not c.poll()]
        time.sleep(0.05)


def run_child(argv: list[str], cap: float, log: Path, env: dict | None = None
              ) -> tuple[int, float]:
    """One `Child` run to its end: (exit code, seconds); 124 when killed at its cap."""
    child = Child(argv, cap, log, env)
    run_children([child])
    return child.rc, child.seconds


class Check:
    """The stages of one run (gpu_check_stages.py) in GROUPS; `report` is the JSON."""

    def __init__(self, args):
        self.args, self.work = args, Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.budget = Budget(args.budget_s)
        self.caps = {**(DRY_CAPS if args.dry_run else CAPS), **args.cap}
        self.report: dict = {"args": dict(vars(args)), "stages": {}}
        self.stages = Stages(args, self.work)

    def run_group(self, names: list[str]) -> None:
        children, stages = {}, {}
        for name in names:
            cap = min(self.caps[name], max(self.budget.left(), 0))
            if cap < 1:
                stages[name] = {"failures": [f"{name}: not run, the "
                                             f"{self.args.budget_s:.0f} s budget is spent"]}
                continue
            argv, env = self.stages.launch(name)
            children[name] = Child(argv, cap, self.work / f"{name}.log", env)
        run_children(list(children.values()), self.args.jobs if len(names) > 1 else 1)
        for name, child in children.items():
            stage = {"rc": child.rc, "seconds": round(child.seconds, 2), "cap_s": child.cap,
                     "failures": []}
            if child.rc == 124:
                stage["failures"].append(f"{name}: killed at its cap of {child.cap:.0f} s")
            elif child.rc != 0:
                stage["failures"].append(f"{name}: exit code {child.rc} (gpu_check_logs.txt)")
            stages[name] = self.stages.finish(name, stage)
        for name in names:  # in the group's order
            stage = stages[name]
            stage["ok"] = not stage["failures"]
            self.report["stages"][name] = stage
            print(f"[gpu_check] {name}: {'ok' if stage['ok'] else 'FAILED'} "
                  f"({stage.get('seconds', 0):.0f} s)", flush=True)
            for line in stage["failures"]:
                print(f"[gpu_check]   {line}", flush=True)

    def run(self) -> dict:
        for group in GROUPS:
            names = [n for n in group if n in self.args.stages]
            if not names:
                continue
            self.run_group(names)
            if names == ["preflight"] and not self.report["stages"]["preflight"]["ok"]:
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
    p.add_argument("--work", default=None,
                   help="stage files and logs (default: a new folder under the temp dir)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dry-run", action="store_true", help="every stage small, on --device cpu")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--cap", nargs="*", type=_cap, default=[], metavar="STAGE=SECONDS")
    p.add_argument("--budget-s", type=float, default=270.0, help="all stages together")
    p.add_argument("--jobs", type=int, default=5, help="stages of a group run side by side")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--contexts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--thought-tokens", type=int, default=256)
    p.add_argument("--prefix-tokens", type=int, default=512, help="max prefix (min: half)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--hbm-tbps", type=float, default=None, help="default: by the card")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: by the card")
    p.add_argument("--references", default=str(REFERENCES),
                   help="folder of the CPU fp32 references (default docs/gpu/reference)")
    p.add_argument("--write-references", action="store_true",
                   help="compute them here on CPU in fp32 and write them to --references")
    args = p.parse_args(argv)
    args.cap = dict(args.cap)
    args.work = args.work or tempfile.mkdtemp(prefix="gpu_check_work_")
    if args.dry_run:
        args.device, args.budget_s = "cpu", max(args.budget_s, 3600.0)
        args.contexts, args.group, args.thought_tokens, args.prefix_tokens = 4, 2, 8, 32
        args.micro_batch, args.jobs = 0, min(args.jobs, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.write_references:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        args.budget_s = max(args.budget_s, 1800.0)
        return write_references(args)
    check = Check(args)
    try:
        report = check.run()
    except BaseException as e:  # the packed files still say what ran before it
        check.report.update(ok=False, error=f"{type(e).__name__}: {e}")
        check.pack(Path(args.out))
        raise
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
