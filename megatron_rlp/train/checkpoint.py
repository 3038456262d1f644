"""Checkpoints through `megatron.core.dist_checkpointing`: everything a run needs to continue
bit for bit, written atomically, loadable into another TP/PP/DP layout.

A checkpoint holds the policy, the fp32 EMA teacher, the optimizer state (Adam moments and
step; the distributed optimizer's as `dp_reshardable` or `fully_reshardable`), the scheduler,
every RNG of every rank (Python, NumPy, torch, CUDA on GPU runs, Megatron's tracker states;
one `ShardedObject` per rank), the step, consumed tokens, skip counters and the resolved
config. The data position needs no state: contexts and NTP windows are drawn from
(seed, step), so the step *is* the sampler position.

Layout under `train.save`:
    step_00000020/     a complete checkpoint (dist_checkpointing format, + integrity.json)
    latest             name of the newest complete checkpoint (replaced last, atomically)
    .tmp_step_*/       a save in progress (or killed); never read, removed by the next save

Protocol: every rank writes into `.tmp_step_N`; only when all ranks succeeded does rank 0
fsync it, rename it to `step_N`, and atomically replace `latest`; then earlier checkpoints
beyond `train.keep_last` are removed. A crash or kill at any point leaves `latest` naming a
complete checkpoint. Every failure is agreed on by all ranks and raised as one
`CheckpointError` with a message for the user.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import os
import queue
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import (
    LocalNonpersistentObject,
    ShardedObject,
    ShardedTensor,
)
from megatron.core.dist_checkpointing.validation import verify_integrity_manifest
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException as DCPException

from megatron_rlp.interop import megatron_lm, names
from megatron_rlp.models.provider import padded_vocab_size
from megatron_rlp.parallel.pipeline import ModelChunks
from megatron_rlp.train import faults
from megatron_rlp.train.builder import TrainState
from megatron_rlp.train.resume import ResumeOptions, match_param_groups, use_checkpoint_schedule

LATEST = "latest"
FORMAT_VERSION = 2
_MODEL, _TEACHER = "model.", "ema."
_REFERENCE = "ref."  # the KL reference policy (rlp.kl_coef > 0, scoring/reference.py)
_NAME = re.compile(r"^step_(\d{8,})$")
_INTEGRITY = "integrity.json"
# Distributed-optimizer formats (Megatron's default `fully_sharded_model_space` fails on save:
# shared/MEGATRON_CPU.md). `dp_reshardable`: every rank writes its own flat shards, no
# communication; reloads with any DP size but the same TP/PP. `fully_reshardable`: gathers
# each parameter's state over DP on save; reloads into any TP/PP/DP layout.
DIST_OPT_FORMATS = ("dp_reshardable", "fully_reshardable")
# Model config keys that change parameter shapes or names: a checkpoint must match them.
_ARCH_KEYS = ("hybrid_layer_pattern", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "kv_channels", "qk_layernorm", "activation", "normalization",
              "untie_embeddings_and_output_weights", "position_embedding_type",
              "mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used, phrased for the user (one line)."""


# ---------------------------------------------------------------------------------------
# Small collective helpers: a failure on any rank becomes the same error on every rank.


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _agree(error: str | None) -> None:
    """Collective: raise CheckpointError(first error) on every rank if any rank has one."""
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)


def _on_rank0(fn, context: str) -> None:
    """Run filesystem work `fn` on rank 0 only; its failure is raised on every rank."""
    error = None
    if _rank() == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported as one line, on every rank
            error = f"{context}: {_reason(e)}"
    _agree(error)


def _reason(e: BaseException, logged: list[str] = ()) -> str:
    """One line for an exception. Megatron's writer threads and torch DCP wrap the real cause
    several times (chained, or per rank in `failures`), and Megatron's writer keeps only the
    class of a thread's exception, logging its text (`logged`, from `_quiet`): report an
    OSError found anywhere in there (disk full, permissions), else the innermost exception."""
    seen, order, stack = set(), [], [e]
    while stack:
        cur = stack.pop(0)
        if not isinstance(cur, BaseException) or id(cur) in seen:
            continue
        seen.add(id(cur))
        order.append(cur)
        if isinstance(cur, OSError) and cur.errno:
            where = f" ({cur.filename})" if cur.filename else ""
            return f"{cur.strerror or os.strerror(cur.errno)} [errno {cur.errno}]{where}"
        stack += [cur.__cause__, cur.__context__]
        for failure in getattr(cur, "failures", {}).values():  # DCP CheckpointException
            stack += list(failure) if isinstance(failure, tuple) else [failure]
    for message in logged:
        if m := re.search(r"\[Errno (\d+)\] ([^'\n]*)", message):
            return f"{m.group(2).strip()} [errno {m.group(1)}]"
    leaf = next((x for x in reversed(order) if not isinstance(x, DCPException)), e)
    text = str(leaf).strip().splitlines()
    return f"{type(leaf).__name__}: {text[0]}" if text else type(leaf).__name__


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quiet():
    """Keep checkpoint I/O off the console and collect its error log lines.

    Megatron logs a deprecation note on every save and each writer thread's error (the
    exception it raises then names only the error's class); torch DCP warns on the root
    logger with a traceback when it falls back to per-rank metadata. Failures come back to us
    as exceptions and are reported once, with the collected messages as the cause.
    """
    collect = _Collect()
    names = ("megatron.core.dist_checkpointing", "torch.distributed.checkpoint")
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    root = logging.getLogger()
    root_level = root.level
    for lg in loggers:
        lg.addHandler(collect)
        lg.propagate = False
    root.setLevel(logging.ERROR)
    try:
        yield collect.messages
    finally:
        root.setLevel(root_level)
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(collect)
            lg.setLevel(level)
            lg.propagate = propagate


def _use_thread_queue() -> None:
    """dist_checkpointing's synchronous save writes in threads but collects results through a
    `multiprocessing.Manager` queue, which spawns a server process (~5 s, and an orphan if
    the job is killed). A plain queue serves threads (shared/MEGATRON_CPU.md)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


@contextlib.contextmanager
def _writer_faults(step: int):
    """Test hook (faults.py): fail or stall Megatron's file writer after its first item."""
    kinds = [k for k in ("save_enospc", "save_stall") if faults.planned(k, step)]
    if not kinds:
        yield
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    original = filesystem_async._write_item

    @functools.wraps(original)  # Megatron inspects its signature
    def write_item(*args, **kwargs):
        result = original(*args, **kwargs)
        for stream in (a for a in args if isinstance(a, io.IOBase)):
            stream.flush()  # part of the file is on disk
        if "save_enospc" in kinds:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        print("[fault] save stalled", file=sys.stderr, flush=True)
        time.sleep(600)
        return result

    filesystem_async._write_item = write_item
    try:
        yield
    finally:
        filesystem_async._write_item = original


# ---------------------------------------------------------------------------------------
# What goes into a checkpoint


def _layout() -> dict[str, int]:
    layout = {"tp": parallel_state.get_tensor_model_parallel_world_size(),
              "pp": parallel_state.get_pipeline_model_parallel_world_size(),
              "dp": parallel_state.get_data_parallel_world_size()}
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vp:
        layout["vp"] = vp
    return layout


def _fmt(layout: dict | None) -> str:
    return " ".join(f"{k.upper()}={v}" for k, v in (layout or {}).items()) or "unknown"


def _rng_states(cuda: bool) -> dict:
    """Every RNG of this rank, as plain values torch.load(weights_only=True) accepts."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(key.copy()), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if cuda:
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(_tuples(states["python"]))
    kind, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, key.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


def _tuples(x):
    """random.setstate wants the nested tuples that serialization may turn into lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _rng_object(state: TrainState) -> ShardedObject:
    lay = _layout()
    offset = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank())
    data = _rng_states(state.cfg.device.type == "cuda")
    return ShardedObject("rng_state", data, (lay["pp"], lay["tp"], lay["dp"]), offset,
                         replica_id=0)


def _inner_optimizers(state: TrainState) -> list:
    opt = state.optimizer
    return list(getattr(opt, "chained_optimizers", [opt]))


def _distributed_optimizer(state: TrainState) -> bool:
    return any(isinstance(o, DistributedOptimizer) for o in _inner_optimizers(state))


def _optimizer_has_state(state: TrainState) -> bool:
    """Adam's state is created lazily by the first applied step."""
    return any(len(o.optimizer.state) > 0 for o in _inner_optimizers(state)
               if getattr(o, "optimizer", None) is not None)


def _strip(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items()}


def _model_sharded_state_dict(model: torch.nn.Module, prefix: str) -> dict:
    """A model's sharded state dict; an interleaved pipeline's chunks nest as chunk0, chunk1..
    (their tensors carry global layer keys, so any layout loads them)."""
    if isinstance(model, ModelChunks):
        return {f"chunk{i}": c.sharded_state_dict(prefix=prefix) for i, c in enumerate(model)}
    return model.sharded_state_dict(prefix=prefix)


def _load_model(model: torch.nn.Module, loaded: dict, prefix: str) -> None:
    if isinstance(model, ModelChunks):
        for i, chunk in enumerate(model):
            chunk.load_state_dict(_strip(loaded[f"chunk{i}"], prefix))
    else:
        model.load_state_dict(_strip(loaded, prefix))


def _model_signature(state: TrainState) -> dict:
    m = state.cfg.model
    sig = {k: getattr(m, k) for k in _ARCH_KEYS}
    sig["hybrid_layer_pattern"] = m.hybrid_layer_pattern.replace("|", "")
    sig["padded_vocab_size"] = padded_vocab_size(state.tokenizer.vocab_size,
                                                 m.make_vocab_size_divisible_by)
    return sig


def _optimizer_kind(state: TrainState, dist_format: str) -> str:
    return f"distributed/{dist_format}" if _distributed_optimizer(state) else "local"


def _zero_padding(tree) -> None:
    """`dp_reshardable` saves the gaps between parameters in the optimizer's flat buckets as
    `torch.empty` tensors (marked `padding`): zero them so a checkpoint's bytes depend only on
    the training state (and identical runs give identical files)."""
    if isinstance(tree, dict):
        pad = tree.get("padding")
        if isinstance(pad, LocalNonpersistentObject) and pad.obj is True:
            for v in tree.values():
                if isinstance(v, ShardedTensor):
                    v.data.zero_()
        for v in tree.values():
            _zero_padding(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _zero_padding(v)


def _sharded_state_dict(state: TrainState, *, training: bool, optimizer: str | None,
                        teacher: bool, rng: bool, is_loading: bool,
                        reference: bool = False) -> dict:
    """`optimizer`: None (no optimizer state) or the kind from `_optimizer_kind`."""
    model_sd = _model_sharded_state_dict(state.policy, _MODEL)
    sd = {"model": model_sd}
    if training and optimizer:
        meta = None
        if optimizer.startswith("distributed/"):
            meta = {"distrib_optim_sharding_type": optimizer.split("/")[1]}
        sd["optimizer"] = state.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                             metadata=meta)
        if not is_loading:
            _zero_padding(sd["optimizer"])
    if training and teacher:
        sd["teacher"] = _model_sharded_state_dict(state.teacher.model, _TEACHER)
    if training and reference:
        sd["reference"] = _model_sharded_state_dict(state.reference.model, _REFERENCE)
    if training and rng:
        sd["rng"] = _rng_object(state)
    return sd


# ---------------------------------------------------------------------------------------
# Saving


def check_writable(root: str) -> None:
    """Collective: fail now, before any training, if checkpoints could not be written."""
    def probe():
        path = Path(root)
        path.mkdir(parents=True, exist_ok=True)
        test = path / f".write_test_{os.getpid()}"
        test.write_bytes(b"ok")
        test.unlink()

    _on_rank0(probe, f"train.save={root!r} is not a writable directory")


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `root/latest` names, if any (no validation)."""
    pointer = Path(root) / LATEST
    try:
        return Path(root) / pointer.read_text().strip()
    except OSError:
        return None


def _dir_bytes(path: Path | None) -> int:
    if path is None or not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def _remove(path: Path) -> None:
    """Rename out of sight first: a half-deleted `step_*` must never look like a checkpoint."""
    trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(state: TrainState, root: str, keep_last: int = 0, checksums: bool = True,
                    counters: dict[str, int] | None = None,
                    dist_optimizer_format: str = "dp_reshardable") -> Path:
    """Save the full training state of every rank (collective); return the checkpoint dir.

    Args:
        keep_last: after the save, remove all but this many newest checkpoints (0 = keep all).
        checksums: also write a SHA-256 manifest (verified by `load_checkpoint`).
        counters: loop counters to restore on resume (e.g. skipped steps).
        dist_optimizer_format: one of DIST_OPT_FORMATS (with the distributed optimizer).

    Raises:
        CheckpointError: on every rank, if any rank failed; `latest` and every earlier
            checkpoint are then untouched, and the partial save is removed.
    """
    root_path = Path(root)
    name = f"step_{state.step:08d}"
    final, tmp = root_path / name, root_path / f".tmp_{name}"
    previous = latest_checkpoint(root_path)
    keep_msg = (f"the last checkpoint is unchanged ({previous})" if previous
                else "no earlier checkpoint exists")

    def prepare():
        root_path.mkdir(parents=True, exist_ok=True)
        for stale in root_path.glob(".tmp_step_*"):  # left by a killed save
            shutil.rmtree(stale)
        for stale in root_path.glob(".trash_*"):
            shutil.rmtree(stale, ignore_errors=True)
        need, free = _dir_bytes(previous), shutil.disk_usage(root_path).free
        if need > free:
            raise OSError(errno.ENOSPC, f"No space left on device: the checkpoint needs "
                          f"about {need >> 20} MiB (like the last one), {free >> 20} MiB free")
        tmp.mkdir()

    _on_rank0(prepare, f"cannot save checkpoint {final}; {keep_msg}")

    teacher = state.teacher is not None and state.teacher.initialized
    optimizer = (_optimizer_kind(state, dist_optimizer_format) if _optimizer_has_state(state)
                 else None)
    reference = getattr(state, "reference", None) is not None and state.reference.initialized
    sd = _sharded_state_dict(state, training=True, optimizer=optimizer, teacher=teacher,
                             rng=True, is_loading=False, reference=reference)
    sd.update(
        format_version=FORMAT_VERSION,
        step=state.step,
        consumed_tokens=state.consumed_tokens,
        counters=dict(counters or {}),
        objective=state.cfg.train.objective,
        teacher_initialized=teacher,
        reference_initialized=reference,
        optimizer_saved=optimizer is not None,
        optimizer_kind=optimizer or "",
        scheduler=state.scheduler.state_dict(),
        layout=_layout(),
        model_signature=_model_signature(state),
        config=state.cfg.to_dict(),
    )
    error = None
    _use_thread_queue()
    with _quiet() as logged:
        try:
            with _writer_faults(state.step):
                dist_checkpointing.save(sd, str(tmp), verify_integrity=checksums)
        except (Exception, DCPException) as e:  # noqa: BLE001 - agreed on below, one line
            error = f"saving checkpoint {final} failed: {_reason(e, logged)}; {keep_msg}"
    try:
        _agree(error)
    except CheckpointError:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    def publish():
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if final.exists():  # a stale save of the same step (e.g. from an earlier run)
            _remove(final)
        os.replace(tmp, final)
        pointer = root_path / f".{LATEST}.tmp"
        with open(pointer, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync(root_path)
        os.replace(pointer, root_path / LATEST)  # the commit point
        _fsync(root_path)
        if keep_last:  # older steps only: later ones belong to another (abandoned) run
            older = [c for step, c in _checkpoints(root_path) if step < state.step]
            for old in older[:max(len(older) - (keep_last - 1), 0)]:
                _remove(old)

    _on_rank0(publish, f"cannot publish checkpoint {final}; {keep_msg}")
    return final


# ---------------------------------------------------------------------------------------
# Loading


def _megatron_lm(path: str | Path) -> Path | None:
    """The iteration dir of a Megatron-LM save (interop/megatron_lm.py), else None."""
    try:
        return megatron_lm.find(path)
    except megatron_lm.MegatronLMError as e:
        raise CheckpointError(str(e)) from None


def resolve_checkpoint(path: str, flag: str = "train.load") -> Path:
    """`path` is a checkpoint directory or a `train.save` root with a `latest` pointer, or a
    Megatron-LM save (its tracker file) or `iter_*` directory. `flag`: what the user set it
    with, as errors name it (a tool's `--load`, `--checkpoint`).

    Raises:
        CheckpointError: nothing usable there (missing, empty, incomplete or bad pointer).
    """
    if (mlm := _megatron_lm(path)) is not None:
        return mlm
    p = Path(path)
    pointer = p / LATEST
    if pointer.exists():
        try:
            raw = pointer.read_bytes()
        except OSError as e:
            raise CheckpointError(f"cannot read {pointer}: {_reason(e)}") from None
        name = raw.decode("utf-8", errors="replace").strip()
        if not _NAME.match(name):
            raise CheckpointError(f"{pointer} is corrupted (expected a name like step_00000020, "
                                  f"found {raw[:40]!r})")
        ckpt = p / name
        if not ckpt.is_dir():
            raise CheckpointError(f"{pointer} names {name}, which does not exist in {p}")
    elif (p / "metadata.json").is_file():
        ckpt = p
    else:
        complete = [c for _, c in _checkpoints(p) if (c / "metadata.json").is_file()] \
            if p.is_dir() else []
        if not complete:
            hint = ""
            if (p / "config.json").is_file():  # a Hugging Face model directory
                out = f"{str(path).rstrip('/')}-megatron"
                hint = (f"; it looks like a Hugging Face model: convert it first with "
                        f"`python tools/convert_checkpoint.py hf-to-megatron --hf-dir {path} "
                        f"--out {out}`, then {flag}={out}")
            raise CheckpointError(f"{flag}={path!r} is not a checkpoint (no '{LATEST}' "
                                  f"pointer, no metadata.json, no step_* checkpoint){hint}")
        ckpt = complete[-1]  # saved, but killed before `latest` was first written
    if not (ckpt / "metadata.json").is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete or corrupted (no metadata.json)")
    return ckpt


def _check_optimizer(saved: str, state: TrainState, ckpt: Path, layout: dict | None) -> None:
    mine = _optimizer_kind(state, "")
    if saved.split("/")[0] != mine.split("/")[0]:
        was = "true" if saved.startswith("distributed") else "false"
        raise CheckpointError(f"checkpoint {ckpt} holds {saved.split('/')[0]} optimizer state: "
                              f"resume with parallel.use_distributed_optimizer={was}")
    moved = {k: (layout or {}).get(k) for k in ("tp", "pp", "vp")} != {
        k: _layout().get(k) for k in ("tp", "pp", "vp")}
    if saved == "distributed/dp_reshardable" and moved:
        raise CheckpointError(
            f"checkpoint {ckpt} holds distributed-optimizer state in the dp_reshardable format, "
            f"which loads only with the same TP/PP ({_fmt(layout)}, now {_fmt(_layout())}); "
            "re-save it in the old layout with train.dist_optimizer_checkpoint="
            "fully_reshardable (same train.steps, another train.save), then load that")


def _check_model(common: dict, state: TrainState, ckpt: Path) -> None:
    saved = common.get("model_signature")
    if saved is None:  # format 1 (before signatures): compare the saved config's model
        model = (common.get("config") or {}).get("model", {})
        saved = {k: model[k] for k in _ARCH_KEYS if k in model}
        if "hybrid_layer_pattern" in saved:
            saved["hybrid_layer_pattern"] = saved["hybrid_layer_pattern"].replace("|", "")
    mine = _model_signature(state)
    diff = [f"{k}={saved[k]!r} (config: {mine[k]!r})" for k in mine
            if k in saved and saved[k] != mine[k]]
    if diff:
        key = "data.tokenizer" if diff[0].startswith("padded_vocab") else "model"
        raise CheckpointError(f"checkpoint {ckpt} does not fit the configured model: "
                              f"{', '.join(diff)}; check {key} settings")


@contextlib.contextmanager
def _step_entries(state: TrainState):
    """`fully_reshardable` loading copies every tensor of torch Adam's per-parameter state from
    the checkpoint, `step` included, but the checkpoint keeps `step` in the param groups
    (restored separately): without a placeholder entry it raises KeyError('step')."""
    patched = [o for o in _inner_optimizers(state) if isinstance(o, DistributedOptimizer)]
    for o in patched:
        original = o._set_main_param_and_optimizer_states
        o._set_main_param_and_optimizer_states = (
            lambda param, tensors, _f=original: _f(param, {"step": None, **tensors}))
    try:
        yield
    finally:
        for o in patched:
            del o._set_main_param_and_optimizer_states  # back to the class method


def _restore_steps(state: TrainState) -> None:
    """Give every parameter of a distributed optimizer its own Adam `step`, from the param
    groups (where Megatron keeps it without Apex/TE). Loading leaves one tensor shared by all
    parameters (torch Adam then advances it once per parameter), and `dp_reshardable` even
    leaves the dummy state's step 1 in place."""
    for o in _inner_optimizers(state):
        if not isinstance(o, DistributedOptimizer):
            continue
        for group in o.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                s = o.optimizer.state.get(p)
                if s is not None and isinstance(s.get("step"), torch.Tensor):
                    s["step"] = torch.tensor(float(group["step"]), dtype=s["step"].dtype,
                                             device=s["step"].device)


def load_checkpoint(state: TrainState, path: str, checksums: bool = True,
                    counters: dict[str, int] | None = None,
                    options: ResumeOptions | None = None) -> str:
    """Load into `state` (collective). Same objective: resume everything. Other objective
    (e.g. NTP warm-up into RLP), or `options.finetune`: warm-start the policy weights only,
    from step 0.

    Args:
        checksums: verify the SHA-256 manifest, when the checkpoint has one.
        counters: updated in place with the loop counters saved with the checkpoint.
        options: what a resume restores (train/resume.py; default: everything, with the
            configured lr schedule applying from the loaded step).

    Returns:
        A line for the log: "resumed ..." or "warm-started ...".

    Raises:
        CheckpointError: on every rank; `state` may be partly loaded but is not used.
    """
    ckpt = resolve_checkpoint(path)
    if _megatron_lm(ckpt) is not None:  # a Megatron-LM torch_dist save: the policy, step 0
        try:
            with _quiet():
                return megatron_lm.load_policy(state, ckpt)
        except megatron_lm.MegatronLMError as e:
            raise CheckpointError(str(e)) from None
    with _quiet() as logged:
        if checksums and (ckpt / _INTEGRITY).is_file():
            try:  # collective: rank 0 hashes every file, the verdict is broadcast
                verify_integrity_manifest(str(ckpt))
            except CheckpointingException as e:
                files = "; ".join(line.strip() for line in str(e).splitlines()[1:])
                raise CheckpointError(f"checkpoint {ckpt} is corrupted (its files do not match "
                                      f"{_INTEGRITY}): {files or _reason(e)}") from None
        try:
            common = dist_checkpointing.load_common_state_dict(str(ckpt))
        except (Exception, DCPException) as e:  # noqa: BLE001 - unreadable, whatever the cause
            raise CheckpointError(f"cannot read checkpoint {ckpt} (truncated or corrupted?): "
                                  f"{_reason(e, logged)}") from None
    if not isinstance(common, dict) or "step" not in common:
        raise CheckpointError(f"checkpoint {ckpt} was not written by megatron-rlp (no step)")
    _check_model(common, state, ckpt)
    options = options or ResumeOptions()
    resume = common.get("objective") == state.cfg.train.objective and not options.finetune
    teacher = resume and state.teacher is not None and bool(common.get("teacher_initialized"))
    has_reference = getattr(state, "reference", None) is not None
    reference = resume and has_reference and bool(common.get("reference_initialized"))
    if resume and has_reference and not reference and common.get("teacher_initialized"):
        # The RLP stage began without a reference: the resumed weights are not pi_ref.
        raise CheckpointError(
            f"checkpoint {ckpt} has no KL reference policy (saved with rlp.kl_coef=0), so "
            f"rlp.kl_coef={state.cfg.rlp.kl_coef} cannot resume from it: resume with "
            "rlp.kl_coef=0, or start a new RLP stage from it (train.finetune=true)")
    layout = common.get("layout")
    same_layout = layout == _layout()
    rng = resume and same_layout and options.load_rng
    optimizer = None
    if resume and options.load_optimizer and common.get("optimizer_saved", True):
        optimizer = common.get("optimizer_kind") or "local"  # format 1: local optimizer only
        _check_optimizer(optimizer, state, ckpt, layout)
        # fp32 and bf16 runs keep different optimizer states (bf16: fp32 main weights), so
        # Adam state does not move between them; the weights do.
        saved_dtype = ((common.get("config") or {}).get("precision") or {}).get("params_dtype")
        now_dtype = state.cfg.precision.params_dtype
        if saved_dtype and saved_dtype != now_dtype:
            raise CheckpointError(
                f"checkpoint {ckpt} was trained with precision.params_dtype={saved_dtype}; its "
                f"optimizer state does not load into a {now_dtype} run: keep "
                f"precision.params_dtype={saved_dtype}, or set train.load_optimizer=false "
                "(the weights load in either precision; Adam starts fresh)")
    if optimizer and optimizer.startswith("distributed/"):
        for o in _inner_optimizers(state):
            if isinstance(o, DistributedOptimizer):
                o._init_optimizer_states_with_dummy_values()  # state to load into
    with torch.no_grad(), _quiet() as logged:
        try:
            sd = _sharded_state_dict(state, training=resume, optimizer=optimizer,
                                     teacher=teacher, rng=rng, is_loading=True,
                                     reference=reference)
            names.match_checkpoint_names(sd, ckpt)  # saved before the TE key map: local names
            loaded = dist_checkpointing.load(sd, str(ckpt))
        except (Exception, DCPException) as e:  # noqa: BLE001 - collective: on every rank
            raise CheckpointError(f"cannot load checkpoint {ckpt} (truncated or corrupted?): "
                                  f"{_reason(e, logged)}") from None
    _load_model(state.policy, loaded["model"], _MODEL)
    if not resume:
        if options.finetune:
            return (f"fine-tuning from the policy weights of a {common.get('objective')} "
                    "checkpoint (train.finetune: step 0, fresh optimizer)")
        return f"warm-started the policy (a {common.get('objective')} checkpoint)"
    if not options.override_scheduler:
        use_checkpoint_schedule(state.optimizer, common["scheduler"])
    if optimizer:
        # Pair Adam state with parameters whatever lr / wd either run had (train/resume.py).
        match_param_groups(state.optimizer, loaded["optimizer"])
        try:
            with torch.no_grad(), _step_entries(state):  # copies into leaf-parameter views
                state.optimizer.load_state_dict(loaded["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"checkpoint {ckpt}: its optimizer state does not fit this optimizer "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); resume "
                "with train.load_optimizer=false to start Adam afresh") from None
        _restore_steps(state)
    # train.override_scheduler: the configured schedule wins (e.g. more train.steps, a new
    # lr), or the checkpoint's; the step count comes from the checkpoint either way.
    state.scheduler.override_opt_param_scheduler = options.override_scheduler
    state.scheduler.use_checkpoint_opt_param_scheduler = not options.override_scheduler
    state.scheduler.load_state_dict(common["scheduler"])
    if teacher:
        _load_model(state.teacher.model, loaded["teacher"], _TEACHER)
        state.teacher.initialized = True
    if reference:
        _load_model(state.reference.model, loaded["reference"], _REFERENCE)
        state.reference.initialized = True
    if rng:
        _set_rng_states(loaded["rng"])
    state.step = int(common["step"])
    state.consumed_tokens = int(common["consumed_tokens"])
    if counters is not None:
        counters.update(common.get("counters") or {})
    note = "" if same_layout else (f" into a new layout ({_fmt(common.get('layout'))} -> "
                                   f"{_fmt(_layout())}; RNG states kept from train.seed)")
    if not optimizer:
        note += " (weights, teacher and schedule; fresh optimizer state: train.load_optimizer)"
    return f"resumed{note}"
