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

One job per module:
    errors.py     CheckpointError, agreed across ranks; one-line causes; quiet Megatron logs
    directory.py  names, `latest`, fsync, publish (tmp + rename), prune, resolve a path
    layout.py     the TP/PP/DP/VP layout a checkpoint is saved in
    sharded.py    the sharded state dict (policy, optimizer, teacher, reference, RNG)
    rng.py        every RNG state of every rank
    optimizer.py  optimizer kinds and formats, fix-ups of the distributed optimizer's state
    compat.py     the load plan: what a checkpoint restores into this run, what it refuses
    patches.py    every patch of Megatron-Core's private parts, with the version checked
    save.py       save_checkpoint
    load.py       load_checkpoint
"""

from megatron_rlp.checkpoint.directory import (
    check_writable,
    holds_checkpoint,
    latest_checkpoint,
    resolve_checkpoint,
)
from megatron_rlp.checkpoint.errors import CheckpointError
from megatron_rlp.checkpoint.load import load_checkpoint
from megatron_rlp.checkpoint.optimizer import DIST_OPT_FORMATS
from megatron_rlp.checkpoint.save import save_checkpoint

__all__ = ["DIST_OPT_FORMATS", "CheckpointError", "check_writable", "holds_checkpoint",
           "latest_checkpoint", "load_checkpoint", "resolve_checkpoint", "save_checkpoint"]
