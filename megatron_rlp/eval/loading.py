"""A checkpoint's policy, ready to evaluate, under any parallel layout.

The run config comes from the checkpoint itself (`train.save` stores the resolved
`RunConfig`): its model, tokenizer, precision, device and RLP thought settings, with `|`
stage cuts removed from the layer pattern (checkpoints hold global layer keys, so any
TP/PP/VP layout loads them; an even split is used unless `model.hybrid_layer_pattern` is
overridden). Command-line overrides (`parallel.*`, `device.*`, `rlp.*`) go on top and the
result is validated like a training config. Without a checkpoint, a config file gives a
freshly initialised model (the same seeded weights as step 0 of training).

Weights are read by the project's own `checkpoint.load_checkpoint` (integrity
manifest, model-shape check, one-line `CheckpointError`s). It restores everything only when
the config's objective equals the checkpoint's, and otherwise warm-starts the policy alone;
an evaluation is never a resume, so it asks with the objective `eval`, which no training run
has: only the policy is read, no optimizer or teacher is built.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from megatron_rlp.config import RunConfig, load_config

# Sections of the saved config that describe the model and how it thinks; the rest (data,
# optimizer, training schedule, parallel layout) belongs to the training run.
_CARRIED = ("model", "precision", "device", "rlp")


@dataclass
class EvalModel:
    """What evaluation needs: the resolved config, the tokenizer and this rank's policy
    (unwrapped `HybridModel` stage or `ModelChunks`, in eval mode)."""

    cfg: RunConfig
    tokenizer: object
    policy: torch.nn.Module
    source: str  # "step_00000300 of DIR" or "fresh initialisation"


def _saved_config(ckpt: Path) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_rlp.checkpoint import CheckpointError

    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is one line
        raise CheckpointError(f"cannot read checkpoint {ckpt}: {type(e).__name__}") from None
    saved = common.get("config") if isinstance(common, dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {ckpt} holds no run config (not megatron-rlp?)")
    return saved


def eval_config(load: str | None, config: str | None, overrides: tuple[str, ...],
                world_size: int) -> RunConfig:
    """The evaluation config: the checkpoint's (or `config`'s) model plus `overrides`.

    Args:
        load: a `train.save` directory or a `step_*` checkpoint, or None.
        config: a YAML run config; required without `load`, else replaces the saved one.
        overrides: `section.key=value` strings.
        world_size: processes; TP x PP must divide it.

    Raises:
        ConfigError: a bad override or layout (one line).
        CheckpointError: `load` is not a readable megatron-rlp checkpoint.
    """
    from megatron_rlp.config import ConfigError

    if load is None and config is None:
        raise ConfigError("invalid config: evaluation needs --load CHECKPOINT or --config FILE")
    with tempfile.TemporaryDirectory() as tmp:
        if config is None:
            from megatron_rlp.checkpoint import resolve_checkpoint

            saved = _saved_config(resolve_checkpoint(load))
            carried = {k: saved[k] for k in _CARRIED if k in saved}
            carried["data"] = {"tokenizer": saved.get("data", {}).get("tokenizer", "byte")}
            carried["train"] = {"seed": saved.get("train", {}).get("seed", 1234)}
            carried["model"]["hybrid_layer_pattern"] = \
                carried["model"]["hybrid_layer_pattern"].replace("|", "")
            config = str(Path(tmp) / "saved.yaml")
            Path(config).write_text(yaml.safe_dump(carried))
        cfg = load_config(config, overrides)
    p = cfg.parallel
    if world_size % (p.tensor_model_parallel_size * p.pipeline_model_parallel_size):
        raise ConfigError(f"invalid config: parallel.tensor_model_parallel_size="
                          f"{p.tensor_model_parallel_size} (allowed: TP*PP dividing the world "
                          f"size {world_size})")
    return cfg


def load_eval_model(cfg: RunConfig, load: str | None, checksums: bool = True) -> EvalModel:
    """Build this rank's policy for `cfg` and read the checkpoint's weights into it
    (collective; call after `megatron_rlp.distributed.initialize(cfg)`).

    Raises:
        CheckpointError: on every rank, with one line (missing, corrupt, other model shape).
    """
    from megatron_rlp.checkpoint import load_checkpoint, resolve_checkpoint
    from megatron_rlp.models.provider import build_stage
    from megatron_rlp.tokenizer import build_tokenizer
    from megatron_rlp.train.builder import TrainState

    tokenizer = build_tokenizer(cfg.data.tokenizer)
    policy = build_stage(cfg, tokenizer.vocab_size)
    source = "fresh initialisation"
    if load is not None:
        ckpt = resolve_checkpoint(load)
        # Only cfg (model keys), tokenizer and policy are read by a policy-only load.
        as_eval = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, objective="eval"))
        state = TrainState(cfg=as_eval, tokenizer=tokenizer, corpus=None, model_chunks=[],
                           policy=policy, optimizer=None, scheduler=None, teacher=None)
        load_checkpoint(state, str(ckpt), checksums)
        source = f"{ckpt.name} of {ckpt.parent}"
    policy.eval()
    return EvalModel(cfg=cfg, tokenizer=tokenizer, policy=policy, source=source)
