"""The training loop: build, optionally load, then step / log / checkpoint until done.

How a run ends (docs/reliability.md):
    done          `train.steps` reached; final checkpoint
    stopped       SIGTERM/SIGUSR1, `train.wall_time_limit_minutes` or `train.exit_interval`:
                  every rank stops after the same step and saves; exit code 0
    TrainingError `train.max_consecutive_skips` non-finite steps in a row; nothing is saved
                  after the last good checkpoint
    CheckpointError / DataError  bad checkpoint, save failure, unusable data
    hung          a step or save not finished within `train.watchdog_minutes`: the rank
                  prints its threads' stacks and exits 3 (train/watchdog.py)
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from megatron.core import parallel_state

from megatron_rlp.checkpoint import (
    check_writable,
    holds_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from megatron_rlp.config import RunConfig
from megatron_rlp.train import faults
from megatron_rlp.train.builder import TrainState, build_state
from megatron_rlp.train.faults import DataError, TrainingError
from megatron_rlp.train.flops import model_dims, ntp_flops, step_flops
from megatron_rlp.train.metrics import MetricsWriter
from megatron_rlp.train.ntp_step import ntp_step
from megatron_rlp.train.resume import resume_options
from megatron_rlp.train.rlp_step import rlp_step
from megatron_rlp.train.samplers import make_context_sampler, make_ntp_batcher
from megatron_rlp.train.signals import StopGuard
from megatron_rlp.train.timers import PhaseTimer
from megatron_rlp.train.validate import eval_sampler, validate
from megatron_rlp.train.watchdog import Watchdog


@dataclass
class RunResult:
    """What `train` hands back: the final state and why the loop ended."""

    state: TrainState
    stopped: str | None = None  # reason for an early clean stop (signal, time, exit_interval)
    counters: dict[str, int] = field(default_factory=dict)


def _from_data_code(e: BaseException) -> bool:
    """Raised while reading or tokenizing the corpus (not a bug elsewhere)?"""
    files = [f.filename for f in traceback.extract_tb(e.__traceback__)]
    return any("/megatron_rlp/data/" in f or "/megatron_rlp/tokenizer/" in f for f in files)


def _build(cfg: RunConfig) -> TrainState:
    try:
        return build_state(cfg)
    except (OSError, ValueError, UnicodeError) as e:
        if not _from_data_code(e):
            raise
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, UnicodeError):
            text = f"not UTF-8 text ({type(e).__name__})"
        raise DataError(f"data.corpus={cfg.data.corpus!r} cannot be used: {text}") from None


def _step_fn(state: TrainState):
    """The step function of the objective, and (when `train.eval_interval`) the evaluator."""
    cfg = state.cfg
    try:
        # The model FLOPs per GPU of rank 0's share of each step, for the step lines'
        # TFLOP/s (train/flops.py: closed forms over the step's rows, no extra pass).
        dims = model_dims(cfg, state.tokenizer.vocab_size)
        p = cfg.parallel
        shards = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        if cfg.train.objective == "rlp":
            sampler = make_context_sampler(state)

            def step(timer):
                trace: dict = {}
                metrics = rlp_step(state, sampler, timer, trace)
                return {**metrics, "flops": step_flops(dims, trace)["step"] / shards}
        else:
            batcher = make_ntp_batcher(state)
            dp = parallel_state.get_data_parallel_world_size()
            flops = ntp_flops(dims, cfg.data.ntp_batch_size // dp, cfg.data.ntp_seq_length)

            def step(timer):
                return {**ntp_step(state, batcher, timer), "flops": flops / shards}
        evaluate = None
        if cfg.train.eval_interval:
            held_out = eval_sampler(state)
            evaluate = lambda: validate(state, held_out)  # noqa: E731
    except ValueError as e:
        raise DataError(f"data.corpus={cfg.data.corpus!r} cannot be used: {e}") from None
    return step, evaluate


def train(cfg: RunConfig) -> RunResult:
    """Run until `cfg.train.steps` optimizer steps (counted from a resumed step, if any)
    or a clean stop; see the module docstring for how a run ends."""
    t = cfg.train
    device = "cuda" if cfg.device.type == "cuda" else "cpu"
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    with StopGuard(t.wall_time_limit_minutes, device) as guard, \
            Watchdog(t.watchdog_seconds(), rank) as watchdog:
        if t.save:
            check_writable(t.save)
        state = _build(cfg)
        writer = MetricsWriter.from_config(cfg)
        try:
            return _run(cfg, state, writer, guard, watchdog)
        finally:
            writer.close()


def _run(cfg: RunConfig, state: TrainState, writer: MetricsWriter, guard: StopGuard,
         watchdog: Watchdog) -> RunResult:
    t = cfg.train
    counters = {"skipped_total": 0, "skipped_in_a_row": 0}
    saved_step = None  # the step whose complete checkpoint exists (never re-saved)
    if t.save and not t.load and latest_checkpoint(t.save) and writer.rank0:
        print(f"[warn] train.save={t.save} already holds checkpoints (latest: "
              f"{latest_checkpoint(t.save).name}) and train.load is not set: this run starts "
              "from step 0 and writes beside them", flush=True)
    load = t.load
    if load and t.save and Path(load).resolve() == Path(t.save).resolve() \
            and not holds_checkpoint(load):
        # Megatron-LM's `--save X --load X`: the first job of a series starts from scratch.
        load = None
        if writer.rank0:
            print(f"[load] no checkpoint in {t.load}: starting from scratch (train.load = "
                  "train.save; later runs resume from it)", flush=True)
    if load:
        source = resolve_checkpoint(load)
        with watchdog.watch(f"loading {source}"):
            how = load_checkpoint(state, str(source), t.checkpoint_checksums, counters,
                                  resume_options(t))
        if how.startswith("resumed") and t.save and source.parent.resolve() == Path(
                t.save).resolve():
            saved_step = state.step  # already in train.save; elsewhere it is saved again
        if writer.rank0:
            print(f"[load] {how} from {source} at step {state.step}", flush=True)
            if state.step >= t.steps:
                print(f"[load] nothing to train: the checkpoint is at step {state.step} and "
                      f"train.steps={t.steps} (the total, counted from step 0)", flush=True)

    def save() -> None:
        nonlocal saved_step
        with watchdog.watch(f"the checkpoint save of step {state.step}"):
            path = save_checkpoint(state, t.save, t.keep_last, t.checkpoint_checksums,
                                   counters, t.dist_optimizer_checkpoint)
        saved_step = state.step
        if writer.rank0:
            print(f"[save] {path}", flush=True)

    (step_fn, evaluate), timer = _step_fn(state), PhaseTimer()
    stopped = None
    while state.step < t.steps:
        with watchdog.watch(f"step {state.step + 1}"):
            faults.stall_if_planned("step_stall", state.step + 1)
            if guard.should_stop():  # collective; also before the first step
                stopped = guard.reason
                break
            skipped = _one_step(state, step_fn, evaluate, timer, writer, counters)
        # No interval checkpoint of a step that just failed to update (its state is the
        # previous step's, already saved or about to be saved at the next good step).
        if t.save and t.save_interval and state.step % t.save_interval == 0 and not skipped:
            save()
        if t.exit_interval and state.step % t.exit_interval == 0 and state.step < t.steps:
            stopped = f"train.exit_interval={t.exit_interval} reached"
            break
    if t.save and saved_step != state.step:
        save()
    if stopped and writer.rank0:
        where = (f"checkpoint of step {state.step} saved; resume with train.load={t.save}"
                 if t.save else "nothing saved (train.save is not set)")
        print(f"[stop] {stopped} after step {state.step}: {where}", flush=True)
    return RunResult(state=state, stopped=stopped, counters=counters)


def _one_step(state: TrainState, step_fn, evaluate, timer: PhaseTimer, writer: MetricsWriter,
              counters: dict[str, int]) -> bool:
    """Step, evaluate when due, log, count a skipped update; return whether it was skipped."""
    t = state.cfg.train
    start = time.perf_counter()
    metrics = step_fn(timer)  # advances state.step, also when the update is skipped
    elapsed = time.perf_counter() - start
    skipped = bool(metrics["skipped"])
    metrics.update(
        lr=state.optimizer.param_groups[0]["lr"],
        step_time=elapsed,
        tokens_per_s=metrics["tokens"] / elapsed,
        **{f"t_{k}": v for k, v in timer.pop().items()},
        **kernel_metrics(),
    )
    if evaluate is not None and state.step % t.eval_interval == 0:
        metrics.update(evaluate())  # held-out metrics on the same row
    writer.log(state.step, metrics,
               console=state.step % t.log_interval == 0 or state.step == 1)
    if skipped:
        _count_skip(state, counters, t.max_consecutive_skips, t.save, writer.rank0)
    else:
        counters["skipped_in_a_row"] = 0
    return skipped


def kernel_metrics() -> dict[str, str | int]:
    """Which GPU kernels this process runs, for the metrics records: `mamba_kernels` (the
    Mamba layers' path, `models.mamba.adapter`) once a Mamba layer was built, and
    `flex_compiles` (inductor compilations of the packed update's FlexAttention so far,
    `packing.flex`) once it compiled, and `decode_compiles` (graph compilations of the
    compiled rollout decode step, `packing.compiled`) once it compiled, and `update_compiles`
    (graph compilations of the update's layers, `train.compiled_update`) once they
    compiled."""
    from megatron_rlp.models.mamba import adapter
    from megatron_rlp.packing import compiled, flex
    from megatron_rlp.train import compiled_update

    out: dict[str, str | int] = {}
    if adapter.kernel_choice() is not None:
        out["mamba_kernels"] = adapter.kernel_choice()
    if flex.compile_count():
        out["flex_compiles"] = flex.compile_count()
    if compiled.compile_count():
        out["decode_compiles"] = compiled.compile_count()
    if compiled_update.compile_count():
        out["update_compiles"] = compiled_update.compile_count()
    return out


def _count_skip(state: TrainState, counters: dict[str, int], limit: int, save: str | None,
                rank0: bool) -> None:
    counters["skipped_total"] += 1
    counters["skipped_in_a_row"] += 1
    n = counters["skipped_in_a_row"]
    if rank0:
        print(f"[skip] step {state.step}: non-finite loss or gradient, update skipped "
              f"({n} in a row, {counters['skipped_total']} in total)", flush=True)
    if n >= limit:
        last = latest_checkpoint(save) if save else None
        raise TrainingError(
            f"{n} consecutive steps with a non-finite loss or gradient (steps "
            f"{state.step - n + 1}-{state.step}, train.max_consecutive_skips={limit}); "
            + (f"stopped, the last good checkpoint is {last}" if last
               else "stopped, no checkpoint was saved"))
