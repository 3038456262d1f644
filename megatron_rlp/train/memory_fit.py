"""Does a launch fit its GPUs? The memory estimate (`train/memory.py`) of a config against the
device's memory, and, when it does not fit, the settings that would: each knob tried alone
with the same estimate, then together.

Start-up (`startup.check_memory`) calls `check_fits` for `device.type=cuda` runs before
torch.distributed starts, so a job that would run out of memory at its first rollout or
update is refused in one line instead of after its model is built:

    invalid launch: estimated peak 245.2 GiB per GPU exceeds the device's 80.0 GiB (8 ranks,
    TP=8 PP=1 DP=1, rollout phase); fits with: rlp.rollout_chunk_contexts=64 (61.7 GiB), ...

The knobs, each changing only memory and time, never the thoughts (keyed sampling) except
`rlp.group_size`, which changes the objective's group and is offered last:
`rlp.rollout_chunk_contexts` (contexts sampled together), `train.micro_batch_size`,
`train.recompute_granularity`, `parallel.tensor_model_parallel_size`,
`parallel.pipeline_model_parallel_size` and `rlp.group_size`. A candidate is offered only
when the config rules accept it for this world size (`RunConfig.validate`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

from megatron_rlp.config import ConfigError, RunConfig
from megatron_rlp.train.memory import GIB, estimate

# Knobs tried one at a time, in the order they are offered (cheapest to the run first).
KNOBS = ("rlp.rollout_chunk_contexts", "train.micro_batch_size", "train.recompute_granularity",
         "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
         "rlp.group_size")


def _get(cfg: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _with(cfg: RunConfig, changes: dict[str, object]) -> RunConfig:
    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        section, name = key.split(".")
        setattr(getattr(out, section), name, value)
    return out


def _dp(cfg: RunConfig, world: int) -> int:
    p = cfg.parallel
    return max(1, world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size))


def _divisors_below(n: int, below: int) -> list[int]:
    """Divisors of n smaller than `below`, largest first."""
    return [d for d in range(min(n, below - 1), 0, -1) if n % d == 0]


def candidates(cfg: RunConfig, world: int, key: str) -> Iterator[object]:
    """Values of `key` that need less memory than `cfg`'s, the least change first."""
    r, t, p = cfg.rlp, cfg.train, cfg.parallel
    local = r.contexts_per_step // _dp(cfg, world)
    if key == "rlp.rollout_chunk_contexts":
        now = min(r.rollout_chunk_contexts or local, local)
        values = _divisors_below(local, now)
        # chunks of whole documents first: a document's contexts share one prefilled window
        yield from [v for v in values if v % r.positions_per_document == 0] or values
    elif key == "train.micro_batch_size":
        sequences = local * r.group_size if t.objective == "rlp" else \
            cfg.data.ntp_batch_size // _dp(cfg, world)
        yield from _divisors_below(sequences, t.micro_batch_size or sequences)
    elif key == "train.recompute_granularity":
        order = ("none", "selective", "full")
        yield from order[order.index(t.recompute_granularity) + 1:]
    elif key == "parallel.tensor_model_parallel_size":
        tp = p.tensor_model_parallel_size * 2
        while tp <= world:
            yield tp
            tp *= 2
    elif key == "parallel.pipeline_model_parallel_size":
        pp = p.pipeline_model_parallel_size + 1
        while pp * p.tensor_model_parallel_size <= world:
            yield pp
            pp += 1
    elif key == "rlp.group_size" and t.objective == "rlp":
        yield from range(r.group_size - 1, 1, -1)


def _valid(cfg: RunConfig, world: int) -> bool:
    try:
        cfg.validate(world)
    except ConfigError:
        return False
    return True


def _peak(cfg: RunConfig, world: int, vocab: int, attention: str) -> float:
    return estimate(cfg, world, vocab, attention)["total"]


def fitting_settings(cfg: RunConfig, world: int, vocab: int, limit_bytes: float,
                     attention: str = "unfused") -> tuple[list[tuple[str, object, float]],
                                                         tuple[dict, float] | None]:
    """What would make `cfg` fit `limit_bytes` per GPU.

    Returns:
        (alone, together): `alone` lists (key, value, peak bytes) for each knob whose first
        fitting value fits by itself (the value closest to the config's); `together` is
        ({key: value}, peak bytes) of a greedy combination (each round the knob change that
        lowers the peak most) when no knob fits alone and some combination does, else None.
    """
    alone = []
    for key in KNOBS:
        for value in candidates(cfg, world, key):
            trial = _with(cfg, {key: value})
            if not _valid(trial, world):
                continue
            peak = _peak(trial, world, vocab, attention)
            if peak <= limit_bytes:
                alone.append((key, value, peak))
                break
    if alone:
        return alone, None
    changes: dict[str, object] = {}
    current = cfg
    for _ in range(len(KNOBS)):
        best = None
        for key in KNOBS:
            if key in changes:
                continue
            for value in candidates(current, world, key):
                trial = _with(current, {key: value})
                if _valid(trial, world):
                    peak = _peak(trial, world, vocab, attention)
                    if best is None or peak < best[2]:
                        best = (key, value, peak)
        if best is None:
            return alone, None
        changes[best[0]] = best[1]
        current = _with(current, {best[0]: best[1]})
        if best[2] <= limit_bytes:
            return alone, _relax(cfg, world, vocab, limit_bytes, attention, changes)
    return alone, None


def _relax(cfg: RunConfig, world: int, vocab: int, limit_bytes: float, attention: str,
           changes: dict[str, object]) -> tuple[dict, float]:
    """Each knob of a fitting combination moved back to the value closest to `cfg`'s that
    still fits with the others (the greedy search takes the lowest peak of each)."""
    changes = dict(changes)
    for key in list(changes):
        others = {k: v for k, v in changes.items() if k != key}
        for value in candidates(_with(cfg, others), world, key):
            trial = _with(cfg, {**others, key: value})
            if _valid(trial, world) and _peak(trial, world, vocab, attention) <= limit_bytes:
                changes[key] = value
                break
    return changes, _peak(_with(cfg, changes), world, vocab, attention)


def check_fits(cfg: RunConfig, world: int, vocab: int, device_gib: float, source: str,
               attention: str = "unfused") -> dict:
    """Refuse `cfg` when its estimated peak per GPU exceeds `device_gib`; return the estimate.

    Args:
        world: total ranks of the launch.
        vocab: the tokenizer's vocabulary (padded as the model pads it).
        device_gib: memory of one GPU, GiB.
        source: where `device_gib` comes from (the GPU's name, or `device.memory_gib`).
        attention: `unfused` (the local spec's materialised softmax) or `flash` (TE's fused).

    Raises:
        ConfigError: one line with the peak, the device memory and the settings that fit.
    """
    est = estimate(cfg, world, vocab, attention)
    limit = device_gib * GIB
    if est["total"] <= limit:
        return est
    lay = est["layout"]
    alone, together = fitting_settings(cfg, world, vocab, limit, attention)
    if alone:
        fix = "fits with any of: " + ", ".join(f"{k}={v} ({peak / GIB:.1f} GiB)"
                                               for k, v, peak in alone)
    elif together is not None:
        fix = "fits with all of: " + " ".join(f"{k}={v}" for k, v in together[0].items()) + \
            f" ({together[1] / GIB:.1f} GiB)"
    else:
        fix = ("no setting of " + ", ".join(KNOBS) + " fits this world size: add GPUs "
               "(more nodes)")
    raise ConfigError(
        f"invalid launch: estimated peak {est['total'] / GIB:.1f} GiB per GPU exceeds the "
        f"device's {device_gib:.1f} GiB ({source}; {lay['world_size']} ranks, TP={lay['tp']} "
        f"PP={lay['pp']} DP={lay['dp']}, {est['peak_phase']} phase "
        f"{est['phase_totals'][est['peak_phase']] / GIB:.1f} GiB; tools/estimate_memory.py "
        f"prints the table); {fix}; or device.skip_memory_check=true to launch anyway")
