"""Checkpoint key names: Transformer Engine's (written since the local spec's keys map) and the
local spec's older ones.

The local spec (models/local_spec.py) stores every pre-norm under Transformer Engine's name
through Megatron's `sharded_state_dict_keys_map`:

| local module (`decoder.layers.i.`) | key in a checkpoint (TE's, `decoder.layers.i.`) |
|------------------------------------|-------------------------------------------------|
| `input_layernorm.*`                | `self_attention.linear_qkv.layer_norm_*`        |
| `pre_mlp_layernorm.*`              | `mlp.linear_fc1.layer_norm_*`                   |
| `norm.*` (Mamba layer)             | `mixer.in_proj.layer_norm_*`                    |

Checkpoints written before that map (this project's format 2 and older, and HF imports of
that time) hold the local names. Rather than bumping the format and refusing them,
`match_checkpoint_names` looks at the checkpoint's tensor index and, if it has local names,
points the sharded state dict about to be loaded at them: old checkpoints keep loading, on
any layout, optimizer and teacher included (their keys embed the parameter keys).
"""

from __future__ import annotations

import re
from pathlib import Path

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedBase

# TE key -> local key, matched anywhere in a key (optimizer keys embed the parameter key).
_TE_TO_LOCAL = (
    (re.compile(r"(layers\.(?:\d+\.)?)self_attention\.linear_qkv\.layer_norm_"),
     r"\1input_layernorm."),
    (re.compile(r"(layers\.(?:\d+\.)?)mlp\.linear_fc1\.layer_norm_"), r"\1pre_mlp_layernorm."),
    (re.compile(r"(layers\.(?:\d+\.)?)mixer\.in_proj\.layer_norm_"), r"\1norm."),
)
_LOCAL = re.compile(r"layers\.(?:\d+\.)?(input_layernorm|pre_mlp_layernorm|norm)\.(weight|bias)$")


def te_to_local_key(key: str) -> str:
    """`...layers.3.mlp.linear_fc1.layer_norm_weight` -> `...layers.3.pre_mlp_layernorm.weight`;
    other keys unchanged."""
    for pattern, local in _TE_TO_LOCAL:
        key, n = pattern.subn(local, key)
        if n:
            break
    return key


_ROUTER = re.compile(r"mlp\.router\.weight$")


def has_local_names(keys) -> bool:
    """True if any tensor key uses the local spec's norm names (a checkpoint from before the
    TE key map). An MoE (`E`) layer's `pre_mlp_layernorm` is not one: TE's MoE layer keeps
    that norm unfused, so both specs store it under that name (its layer has a router)."""
    keys = list(keys)
    moe = {k[:m.start()] for k in keys if (m := _ROUTER.search(k))}  # "...layers.i." prefixes
    for k in keys:
        m = _LOCAL.search(k)
        if m and not (m.group(1) == "pre_mlp_layernorm"
                      and k[:k.rindex("pre_mlp_layernorm.")] in moe):
            return True
    return False


def to_local_names(sharded_state_dict: dict) -> None:
    """Rewrite, in place, every sharded entry's storage key from TE to local names (the nested
    dict structure, used by `load_state_dict`, is unchanged)."""
    def rename(entry):
        if isinstance(entry, ShardedBase):
            entry.key = te_to_local_key(entry.key)
        return entry

    dict_list_map_inplace(rename, sharded_state_dict)


def match_checkpoint_names(sharded_state_dict: dict, checkpoint: str | Path) -> bool:
    """Point `sharded_state_dict` (TE names) at a checkpoint saved with local names, if it is
    one. Returns True when keys were rewritten."""
    keys = dist_checkpointing.load_tensors_metadata(str(checkpoint)).keys()
    if not has_local_names(keys):
        return False
    to_local_names(sharded_state_dict)
    return True
