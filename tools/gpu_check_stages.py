"""The stages of tools/gpu_check.py: for each, the child process to launch and how its output
becomes the stage's result and failures (tools/gpu_check_compare.py decides).

Every stage's `launch(name)` gives (argv for this interpreter, extra environment); `finish(name,
stage)` reads what the child wrote under the work folder and adds to `stage` (a dict with
`rc`, `seconds`, `failures`). The fp32 stages run at `FP32_SHAPE`, the shape the shipped
references (docs/gpu/reference/) were made at, on the GPU and in the dry run alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import gpu_check_compare as cmp
from gpu_check_roofline import qwen3_overrides, summarize

ROOT = Path(__file__).resolve().parents[1]
TINY = {"dense": "examples/configs/tiny_cpu.yaml",
        "hybrid": "examples/configs/tiny_hybrid_cpu.yaml"}
QWEN3 = "examples/configs/qwen3_1p7b.yaml"
BPE = "tests/assets/tiny_bpe/tokenizer.json"
REFERENCES = ROOT / "docs/gpu/reference"
# The fp32 comparison's shape, the same on the GPU and in the references (16 rows of 16 tokens).
FP32_SHAPE = ("rlp.contexts_per_step=4", "train.seed=1234", "train.progress=false")
BF16_STEPS = 3
PACKED = ("--docs", "4", "--positions", "8", "--group", "8", "--window", "1024",
          "--thought", "64", "--repeats", "3")
DRY_PACKED = ("--docs", "1", "--positions", "2", "--group", "2", "--window", "32",
              "--thought", "4", "--repeats", "1", "--block-size", "16")
DRY_QWEN3 = ("model.hybrid_layer_pattern=*-", "model.hidden_size=64", "model.ffn_hidden_size=192",
             "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=16",
             "model.make_vocab_size_divisible_by=1024", "model.max_sequence_length=256")
# Per card: (HBM TB/s, bf16 dense TFLOP/s). Bandwidth from the data sheets (H100 SXM, H200);
# ~790 TFLOP/s is what an 8192^3 bf16 matmul reached on this workplace's H100 and H200
# (/work/.library/device/KINDS.md; the data sheets say 989).
PEAKS = {"H200": (4.8, 790.0), "H100": (3.35, 790.0)}
BENCH_KEYS = ("sparsity", "speedup_flex_vs_mask", "loss", "loss_abs_diff", "grad_max_abs_diff",
              "grad_max_abs")


class Stages:
    """Launch and finish each stage for `args` (tools/gpu_check.py's), files under `work`."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.interp = {"TRITON_INTERPRET": "1"} if args.device == "cpu" else {}

    def _out(self, name: str) -> Path:
        out = self.work / f"{name}.json"
        out.unlink(missing_ok=True)  # never read a previous run's file
        return out

    def _device(self, dtype: str) -> list[str]:
        return [f"device.type={self.args.device}", f"precision.params_dtype={dtype}"]

    def launch(self, name: str) -> tuple[list[str], dict]:
        a, out = self.args, self._out(name)
        kind, _, model = name.partition("_")
        if name == "preflight":
            return ["tools/gpu_check_preflight.py", "--device", a.device, "--out", str(out)], \
                self.interp
        if name == "kernels":
            small = ["--small"] if a.dry_run else []
            return ["tools/gpu_check_kernels.py", "--device", a.device, "--out", str(out),
                    *small], self.interp
        if kind == "fp32":
            return ["tools/gpu_check_step.py", "record", "--config", TINY[model], "--steps", "1",
                    "--out", str(out), *FP32_SHAPE, *self._device("fp32")], {}
        if kind == "bf16":
            return ["tools/gpu_check_step.py", "record", "--config", TINY[model], "--steps",
                    str(self.bf16_steps), "--out", str(out), "train.progress=false",
                    f"train.seed={a.seed}", *self._device("bf16")], {}
        if name == "packed_attention":
            return ["tools/bench_packed_attention.py", "--config", TINY["dense"],
                    *(DRY_PACKED if a.dry_run else PACKED), "--out", str(out),
                    *self._device("bf16"), f"train.seed={a.seed}"], {}
        if name == "qwen3_shape":
            return ["tools/gpu_check_step.py", "measure", "--config", QWEN3, "--out", str(out),
                    *self.qwen3_overrides], {}
        raise ValueError(f"unknown stage {name!r}")

    @property
    def bf16_steps(self) -> int:
        return 2 if self.args.dry_run else BF16_STEPS

    @property
    def qwen3_overrides(self) -> list[str]:
        return qwen3_overrides(self.args, DRY_QWEN3 if self.args.dry_run else (), BPE)

    def peaks(self) -> tuple[float, float]:
        """(HBM TB/s, peak TFLOP/s): the arguments where given, else by the card's name that
        the preflight recorded (PEAKS), else the H100's. On CPU they are a GPU's: the dry
        run's fractions mean nothing."""
        pre = self.work / "preflight.json"
        gpu = json.loads(pre.read_text())["machine"].get("gpu") or "" if pre.is_file() else ""
        hbm, peak = next((v for k, v in PEAKS.items() if k in gpu), PEAKS["H100"])
        return self.args.hbm_tbps or hbm, self.args.peak_tflops or peak

    def finish(self, name: str, stage: dict) -> dict:
        out = self.work / f"{name}.json"
        result = json.loads(out.read_text()) if out.is_file() else None
        kind, _, model = name.partition("_")
        if name in ("preflight", "kernels"):
            if result is not None:  # its own failures say more than its exit code
                stage["failures"] = [f for f in stage["failures"] if "exit code" not in f]
                stage["failures"] += result.pop("failures", [])
                stage.update({k: v for k, v in result.items() if k != "ok"})
            return stage
        if kind == "fp32":
            ref_file = Path(self.args.references) / f"tiny_{model}_fp32.json"
            if not ref_file.is_file():
                stage["failures"].append(f"{name}: no reference {ref_file} "
                                         "(python tools/gpu_check.py --write-references)")
            elif result is not None and not stage["failures"]:
                ref = json.loads(ref_file.read_text())
                stage.update(run=result["run"], step1=result["steps"][0], reference={
                    "file": str(ref_file), "made_with": ref["reference"]["made_with"]})
                stage["failures"] += cmp.compare_record(name, result, ref)
        elif kind == "bf16" and result is not None and not stage["failures"]:
            stage.update(run=result["run"], steps=result["steps"])
            stage["failures"] += cmp.check_steps(name, result["steps"], self.bf16_steps)
        elif name == "packed_attention" and result is not None and not stage["failures"]:
            stage.update({k: result[k] for k in BENCH_KEYS}, update_s=result["seconds"])
            stage["failures"] += cmp.check_flex_vs_mask(result, "bf16")
        elif name == "qwen3_shape" and result is not None and not stage["failures"]:
            stage.update(summarize(result, QWEN3, self.qwen3_overrides, BPE, *self.peaks()))
        if result is None and not stage["failures"]:
            stage["failures"].append(f"{name}: wrote no {out.name}")
        return stage
