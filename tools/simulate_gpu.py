"""One RLP step of a recipe, at full size and in its own layout, on simulated CUDA.

    python tools/simulate_gpu.py --config examples/configs/qwen3_1p7b.yaml \
        [section.key=value ...] [--world-size N] [--stage first|last|both] [--device-gib 80] \
        [--decode-steps 8] [--out FILE.json]

The real step code (`train/rlp_step.py`: rollout prefill and decode, teacher scoring, the
update's forward and backward through Megatron's schedules, the Megatron optimizer, the EMA
update) runs on tensors of `torch._subclasses.fake_tensor.FakeTensorMode` on `cuda:0`, over a
fake process group of the recipe's world size (`torch.testing._internal.distributed.fake_pg`),
as torchtitan's `scripts/estimate/estimation.py` runs its training step. Fake tensors have
shapes, dtypes and devices but allocate nothing, so a 12B model builds in seconds here.
It proves, for the simulated rank (the first and the last pipeline stage run different
code): every tensor meets tensors of its own device and a dtype its op accepts, every shape
fits at the real vocabulary and head layout, and the peak memory by phase
(`torch.distributed._tools.mem_tracker.MemTracker`, storages as allocated, no allocator
fragmentation) and the FLOPs by phase (`torch.utils.flop_counter.FlopCounterMode`).
What it cannot prove (kernels, numerics, NCCL, speed, Transformer Engine): docs/simulated_cuda.md.

Values: data-derived values are computed for real beside the fake tensors, model-derived ones
take the memory worst case (every thought runs to `rlp.max_thought_tokens`):
tools/simulated_values.py. The data is the worst case too: unless `data.corpus=` is given,
a scratch corpus of long documents (`long_document_corpus`) gives every context its full
prefix and every window nearly `max_window_tokens`. CUDA runtime queries:
tools/simulated_cuda.py. Mamba layers call stand-ins of mamba-ssm's and causal-conv1d's fused
kernels, which keep for backward what those keep (tools/simulated_mamba.py). MoE layers: the
routers' choice is even (`--moe-routing worst`: all to this rank's experts) and collectives of
counts repeat this rank's (tools/simulated_moe.py).

Shortcuts that keep a full-size step to minutes on one core (docs/simulated_cuda.md):
- `--decode-steps N` (8) runs the model for N decode steps per rollout chunk and only the
  sampler's bookkeeping after that (the KV cache is allocated for the full thought either
  way); the skipped steps' FLOPs are those of the last decoded one.
- `--update-microbatches N` (2, at least PP) runs the update's forward and backward on the
  N widest micro-batches (the update's peak is the widest one's; with PP the schedule holds
  as many in flight); the others' FLOPs are the run ones' per token.
- The rollout's keyed noise (an int64 hash of [rows, vocabulary]) runs on fake tensors
  without host shadows (`HostValues.opaque`): its values end as floats nobody reads.
- The memory tracker's total is read live after each op, not deep-copied.

Exit codes: 0 fits, 1 a simulated rank does not fit, 2 a bad config or a device/dtype/shape
error of the step (one `error:` line naming the op, its tensors and file:line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from megatron_rlp.config import ConfigError, RunConfig, load_config  # noqa: E402

GIB = 2**30
CARDS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}  # dense bf16 FLOP/s, HBM B/s
# The shipped GPU recipes' stated sizes: the dense ones 4 nodes x 8 GPUs (examples/*.sh),
# the MoE ones 8 nodes x 8 (docs/moe.md, their YAMLs' "Layout (64 x H100 80GB)").
STATED_WORLD = 32
STATED_WORLD_MOE = 64


def default_world_size(cfg: RunConfig) -> int:
    """The recipe's stated world size: for a `device: cuda` recipe 64 GPUs with MoE layers
    (`E` in the pattern) and 32 without, else one data-parallel rank of its TP x PP layout."""
    p = cfg.parallel
    if cfg.device.type == "cuda":
        return STATED_WORLD_MOE if "E" in cfg.model.hybrid_layer_pattern else STATED_WORLD
    return p.tensor_model_parallel_size * p.pipeline_model_parallel_size


class PhaseMemTracker:
    """PyTorch's `MemTracker` (storages live on `cuda`, by category), whose peak is also kept
    per phase of the step: its `_update_peak_stats` (called after every op) notes the
    current total under the phase that is running. Its per-module snapshots are off (their
    hooks refuse a module called more than once, as every decode step calls the model)."""

    def __init__(self):
        from torch.distributed._tools.mem_tracker import MemTracker

        outer = self

        class Tracker(MemTracker):
            def _update_peak_stats(self, peak_state):
                super()._update_peak_stats(peak_state)
                outer.note()

            def _pre_fw_hook(self, *args):
                pass

            _post_fw_hook = _pre_bw_hook = _post_bw_hook = _pre_fw_hook

        self.tracker = Tracker()
        self.phase = "build"
        self.peaks: dict[str, int] = {}

    def current(self) -> int:
        # `get_tracker_snapshot` deep-copies the snapshot; this runs after every op, so read
        # the tracker's live totals instead (the same numbers, nothing copied).
        snap = self.tracker._curr_mem_snap
        return sum(v.get("Total", 0) for d, v in snap.items() if d.type == "cuda")

    def note(self) -> None:
        now = self.current()
        if now > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = now


class Phases:
    """The step's `timer(phase)`: peak memory, FLOPs (exclusive of nested phases) and wall
    seconds per phase. `optimizer` and `ema` run inside the step's `update` phase."""

    def __init__(self, memory: PhaseMemTracker, flops):
        self.memory, self.flops = memory, flops
        self.flops_by_phase: dict[str, int] = {}
        self.grown: dict[str, int] = {}  # bytes still held at a phase's end that it allocated
        self.seconds: dict[str, float] = {}
        self.stack = ["build"]

    def charge(self) -> None:
        """Give the FLOPs counted since the last call to the running phase."""
        total = self.flops.get_total_flops()
        phase = self.stack[-1]
        self.flops_by_phase[phase] = self.flops_by_phase.get(phase, 0) + total - self._last
        self._last = total

    _last = 0

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self.charge()
        self.stack.append(phase)
        self.memory.phase = phase
        self.memory.note()
        t0 = time.perf_counter()
        start = self.memory.current()
        try:
            yield
        finally:
            self.grown[phase] = self.grown.get(phase, 0) + self.memory.current() - start
            self.charge()
            self.stack.pop()
            self.memory.phase = self.stack[-1]
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0
            if os.environ.get("SIMULATE_GPU_DEBUG"):
                import resource

                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                print(f"[simulate_gpu] {phase}: {self.seconds[phase]:.1f} s, host max RSS "
                      f"{rss:.2f} GiB", file=sys.stderr, flush=True)


def _wrap(owner, name: str, phases: Phases, phase: str, stack: contextlib.ExitStack) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        with phases(phase):
            return original(*args, **kwargs)

    stack.enter_context(mock.patch.object(owner, name, wrapped))


class DecodeCut:
    """Runs the model for `steps` decode steps per rollout chunk, then only advances the cache
    offset and hands back the last logits, and the sampler hands back its last tokens and
    log-probs: the loop's bookkeeping (and the update batch) still sees every thought run
    to its limit. Records the largest KV/SSM cache and the FLOPs
    the skipped steps would have cost (those of the last decoded step)."""

    def __init__(self, steps: int | None, phases: Phases):
        self.steps, self.phases = steps, phases
        self.cache_bytes = 0
        self.decoded = self.skipped = 0
        self.skipped_flops = 0

    def install(self, stack: contextlib.ExitStack) -> None:
        from megatron_rlp.rollout.engine import KVCacheEngine

        original = KVCacheEngine._forward
        cut = self
        # the engine by weak reference: holding it would keep its KV cache past the rollout
        state = {"engine": lambda: None, "count": 0, "logits": None, "flops": 0, "rows": None,
                 "skipped": False}

        def _forward(engine, tokens, mask, call=None):
            if state["engine"]() is not engine:
                state.update(engine=weakref.ref(engine), count=0, logits=None, rows=None)
            cut.cache_bytes = max(cut.cache_bytes, _cache_bytes(engine.ctx))
            decode = tokens.shape[1] == 1
            # a step is skipped only at the rows of the last decoded one (the `<think>` step
            # before the G-way fork decodes one row per context, the steps after it G)
            state["skipped"] = (decode and cut.steps is not None and state["count"] >= cut.steps
                                and state["rows"] == tokens.shape[0])
            if state["skipped"]:
                engine.ctx.increment_sequence_len_offset(1)
                cut.skipped += 1
                cut.skipped_flops += state["flops"]
                return state["logits"]
            before = cut.phases.flops.get_total_flops()
            logits = original(engine, tokens, mask, call)
            if decode:
                state["count"] += 1
                state["rows"] = tokens.shape[0]
                cut.decoded += 1
                state["flops"] = cut.phases.flops.get_total_flops() - before
            state["logits"] = logits
            cut.cache_bytes = max(cut.cache_bytes, _cache_bytes(engine.ctx))
            return logits

        stack.enter_context(mock.patch.object(KVCacheEngine, "_forward", _forward))

        # Once the model is cut, the sampler's ops repeat at the same shapes every step (no
        # thought closes, no row leaves): they ran, checked and counted, for the first
        # `steps` steps; later steps reuse their result.
        from megatron_rlp.rollout import thoughts

        def reuse(name):
            original = getattr(thoughts, name)
            memo = {}

            def run(*args, **kwargs):
                if state["skipped"] and name in memo:  # the model step was skipped too
                    return memo[name]
                memo[name] = out = original(*args, **kwargs)
                return out

            stack.enter_context(mock.patch.object(thoughts, name, run))

        reuse("sample_vocab_parallel")
        reuse("token_logprobs_vocab_parallel")


class UpdateCut:
    """Runs the update's forward and backward on `keep` micro-batches (at least PP, so that
    the 1F1B schedule holds as many in flight as it does with all of them), the widest ones,
    in their order; the others are left out. Every micro-batch is padded to the same rows, so
    the widest has the largest activations: the update's peak is that of the full pass.
    The left-out ones' FLOPs are those of the run ones per token, times their tokens."""

    def __init__(self, keep: int | None, phases: Phases):
        self.keep, self.phases = keep, phases
        self.run = self.skipped = 0
        self.skipped_flops = 0

    def install(self, stack: contextlib.ExitStack) -> None:
        from megatron.core import parallel_state

        from megatron_rlp.train import update

        original = update._forward_backward
        cut = self

        def _forward_backward(state, microbatches, forward_step, seq_length):
            keep = len(microbatches) if cut.keep is None else max(
                cut.keep, parallel_state.get_pipeline_model_parallel_world_size())
            widths = [_tokens(mb) for mb in microbatches]
            chosen = sorted(sorted(range(len(microbatches)), key=lambda i: -widths[i])[:keep])
            before = cut.phases.flops.get_total_flops()
            losses = original(state, [microbatches[i] for i in chosen], forward_step,
                              seq_length)
            run_tokens = sum(widths[i] for i in chosen)
            left_tokens = sum(widths) - run_tokens
            cut.run += len(chosen)
            cut.skipped += len(microbatches) - len(chosen)
            cut.skipped_flops += (cut.phases.flops.get_total_flops() - before) * left_tokens \
                // max(run_tokens, 1)
            return losses

        stack.enter_context(mock.patch.object(update, "_forward_backward", _forward_backward))


def _tokens(microbatch: dict) -> int:
    """Token slots of an update micro-batch: its rows x width (the widest tensor's)."""
    return max(t.shape[0] * t.shape[-1] for t in microbatch.values()
               if isinstance(t, torch.Tensor) and t.dim() >= 2)


def _cache_bytes(ctx) -> int:
    """Bytes of the tensors in Megatron's inference context (attention K/V, Mamba states)."""
    from torch.utils import _pytree as pytree

    tensors = {id(t): t for t in pytree.tree_leaves(list(ctx.key_value_memory_dict.values()))
               if isinstance(t, torch.Tensor)}
    return sum(t.untyped_storage().nbytes() for t in tensors.values())


def long_document_corpus(cfg: RunConfig, path: Path, documents: int = 256) -> Path:
    """A JSONL corpus of `documents` random-letter documents, each 4 windows long, for the
    byte tokenizer (one token a character): every context then keeps its full
    `rlp.max_prefix_tokens` prefix and every document window nears `max_window_tokens`, the
    data's memory worst case (the shipped `data/corpus.jsonl` has short documents, whose
    windows are cut by the document's start)."""
    import random

    rng = random.Random(0)
    length = 4 * cfg.rlp.max_window_tokens()
    letters = "abcdefghijklmnopqrstuvwxyz     "
    with open(path, "w") as f:
        for _ in range(documents):
            f.write(json.dumps({"text": "".join(rng.choices(letters, k=length))}) + "\n")
    return path


def stage_rank(stage: str, world_size: int) -> int:
    """The global rank simulated for a stage: 0 is on the first pipeline stage and the last
    rank on the last (Megatron orders ranks tp-cp-ep-dp-pp, pipeline outermost)."""
    return 0 if stage == "first" else world_size - 1


def simulate_rank(cfg: RunConfig, world_size: int, rank: int, device_gib: float = 80.0,
                  decode_steps: int | None = 8, update_microbatches: int | None = 2,
                  card: str = "H100", mfu: float = 0.4, mamba_kernels: str = "fused",
                  moe_routing: str = "even") -> dict:
    """Build the run of `cfg` for global `rank` of `world_size` on fake CUDA and run one RLP
    step; return the rank's report (module docstring; keys listed in `docs/simulated_cuda.md`).

    Raises:
        simulated_values.SimulationError: a device, dtype or shape error of an op (one line).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from simulated_attention import fused_attention  # registers its FLOP formulas first
    from simulated_autograd import PythonEngine, ddp_hooks
    from simulated_cuda import initialize_model_parallel, simulated_cuda
    from simulated_mamba import fused_mamba_kernels
    from simulated_moe import collective_values, routing_rule
    from simulated_values import HostValues, Oracle
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_rlp.parallel.pipeline import chunks_of
    from megatron_rlp.rollout import sampling, vocab_parallel
    from megatron_rlp.scoring.ema_teacher import EMATeacher
    from megatron_rlp.train.builder import build_state
    from megatron_rlp.train.rlp_step import rlp_step
    from megatron_rlp.train.samplers import make_context_sampler

    t0 = time.perf_counter()
    p = cfg.parallel
    oracle = Oracle()
    memory = PhaseMemTracker()
    flops = FlopCounterMode(display=False)
    phases = Phases(memory, flops)
    cut = DecodeCut(decode_steps, phases)
    update_cut = UpdateCut(update_microbatches, phases)
    with contextlib.ExitStack() as stack:
        stack.enter_context(simulated_cuda(device_gib, name=card))
        if mamba_kernels == "fused":  # mamba-ssm's kernels, as a GPU runs them
            stack.enter_context(fused_mamba_kernels())
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        stack.callback(dist.destroy_process_group)
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        values = stack.enter_context(HostValues(oracle))
        if cfg.model.num_experts:  # the router's choice, the counts' collectives: simulated_moe
            values.collectives = collective_values
            stack.enter_context(routing_rule(values, moe_routing))
        for module in (sampling, vocab_parallel):  # simulated_values.HostValues.opaque
            stack.enter_context(mock.patch.object(module, "keyed_uniform",
                                                  values.opaque(sampling.keyed_uniform)))
        stack.enter_context(memory.tracker)
        stack.enter_context(fused_attention())  # what the GPU's fused kernels keep and compute
        stack.enter_context(flops)
        initialize_model_parallel(p, stack)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
        with torch.device("cuda"):  # what `model.cuda()` would do on a GPU (module docstring)
            state = build_state(cfg)
        built = memory.current()
        params = sum(q.numel() * q.element_size() for c in chunks_of(state.policy)
                     for q in c.parameters())
        _wrap(state.optimizer, "step", phases, "optimizer", stack)
        _wrap(EMATeacher, "update", phases, "ema", stack)
        cut.install(stack)
        update_cut.install(stack)
        engine = PythonEngine(ddp_hooks(state.model_chunks))
        stack.enter_context(mock.patch.object(  # simulated_autograd.py says why
            torch.autograd.Variable, "_execution_engine", engine))
        stack.enter_context(engine.saved())
        sampler = make_context_sampler(state)
        t1 = time.perf_counter()
        rlp_step(state, sampler, phases)
        phases.charge()
        after = memory.current()
        stage = ("first" if parallel_state.is_pipeline_first_stage() else "") + (
            "last" if parallel_state.is_pipeline_last_stage() else "")
    # The first optimizer step creates Adam's m and v (torch.optim's lazy state); every later
    # step's rollout, scoring and update run with them: its peak is the steady one.
    first_step_state = max(phases.grown.get("optimizer", 0), 0)
    before_optimizer = ("rollout", "scoring", "update")
    steady = {k: v + (first_step_state if k in before_optimizer else 0)
              for k, v in memory.peaks.items()}
    peak = max(steady.values())
    peak_flops, hbm = CARDS[card]
    flops_by_phase = dict(phases.flops_by_phase)
    flops_by_phase["rollout"] = flops_by_phase.get("rollout", 0) + cut.skipped_flops
    flops_by_phase["update"] = flops_by_phase.get("update", 0) + update_cut.skipped_flops
    step_flops = sum(v for k, v in flops_by_phase.items() if k != "build")
    compute_s = step_flops / (peak_flops * mfu)
    # Decode is bound by reading the weights and the cache once per step.
    decode_steps_total = cut.decoded + cut.skipped
    memory_s = decode_steps_total * (params + cut.cache_bytes) / hbm
    return {
        "stage": {"first": "first", "last": "last", "firstlast": "only"}.get(stage, "middle"),
        "rank": rank,
        "world_size": world_size,
        "layout": {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
                   "dp": parallel_state_dp(world_size, p), "ep": p.expert_model_parallel_size},
        "peak_gib": round(peak / GIB, 2),
        "peak_bytes": peak,
        "device_gib": device_gib,
        "fits": peak <= device_gib * GIB,
        "peak_gib_by_phase": {k: round(v / GIB, 2) for k, v in steady.items()},
        "first_step_peak_gib_by_phase": {k: round(v / GIB, 2) for k, v in memory.peaks.items()},
        "first_step_state_gib": round(first_step_state / GIB, 2),
        "model_state_gib": round(after / GIB, 2),
        "built_gib": round(built / GIB, 2),
        "params_gib": round(params / GIB, 2),
        "params_bytes": params,
        "kv_ssm_cache_gib": round(cut.cache_bytes / GIB, 2),
        "kv_ssm_cache_bytes": cut.cache_bytes,
        "flops_by_phase": {k: v for k, v in flops_by_phase.items() if k != "build"},
        "decode_steps": {"run": cut.decoded, "skipped": cut.skipped},
        "update_microbatches": {"run": update_cut.run, "skipped": update_cut.skipped},
        "step_time_s": {"mfu": mfu, "card": card, "compute_bound": float(f"{compute_s:.3g}"),
                        "decode_memory_bound": float(f"{memory_s:.3g}"),
                        "estimate": float(f"{compute_s + memory_s:.3g}")},
        "host_reads_answered": dict(oracle.reads),
        "wall_s": {"build": round(t1 - t0, 1), "step": round(time.perf_counter() - t1, 1)},
    }


def gpu_packed_attention(cfg: RunConfig) -> str:
    """The packed update's attention simulated for `cfg` on CUDA: `flex` where the recipe
    resolves to it (`packing.flex.resolve`), else `split` (a stand-in for `mask`)."""
    from megatron_rlp.train.rlp_update import packed_attention

    return "flex" if packed_attention(cfg) == "flex" else "split"


def parallel_state_dp(world_size: int, p) -> int:
    return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)


def simulate(cfg: RunConfig, world_size: int, stages: list[str], **options) -> dict:
    """`simulate_rank` for the first and/or last pipeline stage; the JSON report."""
    if cfg.parallel.pipeline_model_parallel_size == 1:  # one stage, first and last: rank 0
        stages = stages[:1]
    ranks = {stage_rank(s, world_size): s for s in stages}
    out = [simulate_rank(cfg, world_size, r, **options) for r in ranks]
    return {"config": cfg.model.name, "world_size": world_size, "ranks": out,
            "fits": all(r["fits"] for r in out),
            "simulated_with": {"model.packed_attention": cfg.model.packed_attention,
                               "model.transformer_impl": "local",
                               "mamba_kernels": options.get("mamba_kernels", "fused"),
                               "decode_steps": options.get("decode_steps"),
                               "update_microbatches": options.get("update_microbatches"),
                               **({"moe_routing": options.get("moe_routing", "even")}
                                  if cfg.model.num_experts else {})}}


def main(argv: list[str] | None = None) -> int:
    from estimate_memory import number

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--world-size", type=number(int, 1), default=None,
                        help=f"default: {STATED_WORLD} for a device=cuda recipe "
                        f"({STATED_WORLD_MOE} with MoE layers), else TP x PP")
    parser.add_argument("--stage", choices=("first", "last", "both"), default="both")
    parser.add_argument("--device-gib", type=number(float, 0, above=True), default=80.0)
    parser.add_argument("--card", choices=sorted(CARDS), default="H100")
    parser.add_argument("--mfu", type=number(float, 0, above=True), default=0.4,
                        help="for the step-time estimate")
    parser.add_argument("--decode-steps", type=number(int, 0), default=8,
                        help="decode steps the model runs per rollout chunk (0: all)")
    parser.add_argument("--update-microbatches", type=number(int, 0), default=2,
                        help="update micro-batches run (the widest; at least PP; 0: all)")
    parser.add_argument("--moe-routing", choices=("even", "worst"), default="even",
                        help="the routers' choice (tools/simulated_moe.py)")
    parser.add_argument("--out", help="write the JSON report here (else stdout)")
    args = parser.parse_intermixed_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from simulated_values import SimulationError, UnknownValue

    # The packed update runs the attention the recipe resolves to on CUDA: FlexAttention for
    # an attention-only recipe, its compiled kernel replaced by a fused stand-in
    # (tools/simulated_attention.py). Where the recipe would run `mask` (Mamba layers), the
    # split path (the window causally, each branch against its prefix and itself, no [S, S]
    # matrix) stands in, unless the command line names one (docs/simulated_cuda.md).
    forced = ("device.type=cuda",)
    scratch = tempfile.TemporaryDirectory(prefix="simulate_gpu_")
    try:
        cfg = load_config(args.config, (*args.overrides, *forced))
        if not any(o.startswith("model.packed_attention=") for o in args.overrides):
            forced = (*forced, f"model.packed_attention={gpu_packed_attention(cfg)}")
        if not any(o.startswith("data.corpus=") for o in args.overrides):
            # long documents: the data's memory worst case (long_document_corpus)
            corpus = long_document_corpus(cfg, Path(scratch.name) / "long_documents.jsonl")
            forced = (*forced, f"data.corpus={corpus}")
        # the recipe's own device decides its stated world size (before cuda is forced)
        world = args.world_size or default_world_size(load_config(args.config, args.overrides))
        cfg = load_config(args.config, (*args.overrides, *forced), world_size=world)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stages = ["first", "last"] if args.stage == "both" else [args.stage]
    try:
        report = simulate(cfg, world, stages, device_gib=args.device_gib,
                          decode_steps=args.decode_steps or None,
                          update_microbatches=args.update_microbatches or None,
                          card=args.card, mfu=args.mfu, moe_routing=args.moe_routing)
    except (SimulationError, UnknownValue) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["overrides"] = list(args.overrides)  # beside the recipe's YAML
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    for r in report["ranks"]:
        print(f"rank {r['rank']} ({r['stage']} stage): peak {r['peak_gib']} of "
              f"{r['device_gib']} GiB ({'fits' if r['fits'] else 'does NOT fit'})",
              file=sys.stderr)
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
