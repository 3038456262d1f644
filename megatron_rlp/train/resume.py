"""Resume options as Megatron-LM has them, and Adam state matched to parameters regardless of
the groups' hyper-parameters.

    train.finetune            --finetune: policy weights only, from step 0
    train.load_optimizer      false = --no-load-optim: a fresh Adam state
    train.load_rng            false = --no-load-rng: RNG states from train.seed
    train.override_scheduler  true = --override-opt_param-scheduler: the configured lr / wd
                              schedule applies from the loaded step; false =
                              --use-checkpoint-opt_param-scheduler: the checkpoint's

Why the group matching is here: Megatron's optimizers pair a checkpoint's parameter groups
with the current ones by a key that includes the groups' `max_lr` / `min_lr` (and `start_wd`
/ `end_wd` when a group overrides them), `optimizer.param_group_identifier_keys`. Any change
of `optimizer.lr` between runs then fails with `ValueError: Could not find parameter group
with key (None, 3e-05, ...)`, although the parameters and their Adam moments are the same.
Changing the lr between phases (a cooldown, an NTP baseline continued at RLP's lr) is
routine, so groups are paired here by what decides which parameters they hold (the
structural keys: `wd_mult`, `lr_mult`, expert / decoupled-lr flags, their order), and the
checkpoint's groups take the hyper-parameters of the schedule that applies.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from megatron.core.optimizer.optimizer import param_group_identifier_keys

from megatron_rlp.config import TrainConfig

# Schedule values a group may carry; everything else in the identifier is structural.
HYPER_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


@dataclass(frozen=True)
class ResumeOptions:
    """What `load_checkpoint` restores of a same-objective checkpoint (see module docstring)."""

    finetune: bool = False
    load_optimizer: bool = True
    load_rng: bool = True
    override_scheduler: bool = True


def resume_options(t: TrainConfig) -> ResumeOptions:
    return ResumeOptions(finetune=t.finetune, load_optimizer=t.load_optimizer,
                         load_rng=t.load_rng, override_scheduler=t.override_scheduler)


def _structure(group: dict) -> tuple:
    keys = [k for k in param_group_identifier_keys if k not in HYPER_KEYS]
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in keys)


def _find_param_groups(tree) -> list | None:
    """The `param_groups` list of one optimizer's (loaded) state dict, wherever Megatron's
    wrapper nests it (`optimizer.param_groups` or `param_groups`)."""
    if isinstance(tree, dict):
        if isinstance(tree.get("param_groups"), list):
            return tree["param_groups"]
        for v in tree.values():
            found = _find_param_groups(v)
            if found is not None:
                return found
    return None


def use_checkpoint_schedule(optimizer, scheduler_state: dict) -> None:
    """--use-checkpoint-opt_param-scheduler: the current groups take the checkpoint
    schedule's lr bounds (and weight decay bounds, where a group carries them)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            group["max_lr"] = scheduler_state["max_lr"] * group.get("lr_mult", 1.0)
            group["min_lr"] = scheduler_state["min_lr"] * group.get("lr_mult", 1.0)
            for k in ("start_wd", "end_wd"):
                if k in group and k in scheduler_state:
                    group[k] = scheduler_state[k]


def match_param_groups(optimizer, loaded: dict) -> None:
    """Give every saved parameter group the hyper-parameters of its current counterpart, so
    that Megatron's `load_state_dict` pairs them whatever lr / wd either run was given.

    Groups pair by structural key and, among equal keys, by order. A checkpoint whose groups
    do not pair one to one is left alone (Megatron's own error then names the mismatch).

    Args:
        optimizer: the run's `MegatronOptimizer` (possibly a `ChainedOptimizer`).
        loaded: its loaded state dict (`dist_checkpointing.load(...)["optimizer"]`), edited
            in place.
    """
    inners = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    parts = [loaded] if len(inners) == 1 else [loaded[i] for i in range(len(inners))]
    for inner, part in zip(inners, parts, strict=True):
        saved = _find_param_groups(part)
        current = inner.optimizer.param_groups
        if saved is None or len(saved) != len(current):
            continue
        by_structure: dict[tuple, list[dict]] = defaultdict(list)
        for group in current:
            by_structure[_structure(group)].append(group)
        pairs = []
        for group in saved:
            candidates = by_structure.get(_structure(group))
            if not candidates:
                pairs = None
                break
            pairs.append((group, candidates.pop(0)))
        if pairs is None:
            continue
        for old, new in pairs:
            for k in HYPER_KEYS:
                if k in new:
                    old[k] = new[k]
                else:
                    old.pop(k, None)
