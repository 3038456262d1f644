"""Megatron-LM `torch_dist` checkpoints in and out.

A Megatron-LM run (`pretrain_gpt.py`, `pretrain_mamba.py` / `pretrain_hybrid.py`) saves:

    SAVE/latest_checkpointed_iteration.txt   "1000" (or "release")
    SAVE/iter_0001000/                       metadata.json, .metadata, __*_*.distcp
                                             (+ common.pt from older megatron-core)

The common state (`args`, `iteration`, `checkpoint_version`) is read with
`dist_checkpointing.load_common_state_dict`, wherever that version put it (megatron-core 0.19
keeps it in the DCP metadata, older ones in `common.pt`).

In: `train.load=SAVE` or `train.load=SAVE/iter_0001000` warm-starts the RLP policy at step 0
(the EMA teacher is then lazily copied from it, as after any warm start). The architecture
comes from the saved `args`: `train.use_checkpoint_args=true` takes the model section from
them (as Megatron-LM's `--use-checkpoint-args`), otherwise the configured model is checked
against them and every mismatch is named in one line. Parameter names are Transformer
Engine's on both sides (the local spec maps its norms: `interop.names`). A GPT checkpoint
(stacked `decoder.layers.*` tensors, `final_layernorm`) is read into the `*-*-...` (or, with
`--num-experts`, `*E*E...`) HybridModel through Megatron's own `gpt_checkpoint_interop`
retargeting, the same code Megatron-LM uses to load GPT checkpoints into hybrid runs.
dist_checkpointing reshards: any saved TP/PP/EP loads into any TP/PP/VP/EP layout.

MoE (`E` layers): Megatron-LM stores every layer's routed experts as one tensor with an
expert axis, `decoder.layers.i.mlp.experts.experts.linear_fc{1,2}.weight` [experts, out, in]
(GPT: `decoder.layers.mlp.experts.experts...` [layers, experts, out, in]), whether it ran
`SequentialMLP` or TE's grouped GEMM and whatever its EP (`singleton_local_shards` is off in
Megatron-LM); the router `mlp.router.weight` (+ `mlp.router.expert_bias`) and the shared
expert `mlp.shared_experts.linear_fc{1,2}.weight`. This project's local experts store the
same keys, so the weights need no mapping; the routing args are read like the sizes.

Optimizer state is not read (Megatron-LM's Adam state belongs to a different objective and
schedule; start RLP with a fresh optimizer, as the paper does).

Out: `export_megatron_lm` (tools/convert_checkpoint.py `megatron-to-megatron-lm`) writes the
policy with Megatron-LM's own `megatron.training.checkpointing.save_checkpoint`: iteration
directory, tracker file, the common state with an `args` namespace built by Megatron-LM's own
argument parser from this project's config, TE names; as a hybrid checkpoint
(`pretrain_hybrid.py`), or for a `*-` repeated pattern as a GPT one (`pretrain_gpt.py`).

Why this is not Megatron-LM's `load_checkpoint`: that one needs Megatron-LM's global args,
its tokenizer, the full optimizer and scheduler and resumes all of them; a policy warm start
needs only the model part, which is the same `dist_checkpointing.load` call.
"""

from __future__ import annotations

import re
from argparse import Namespace
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.gpt_checkpoint_interop import (
    gpt_compatible_layer_maps,
    retarget_sharded_state_dict_to_gpt_checkpoint,
)
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

from megatron_rlp.interop import names
from megatron_rlp.models.vocab import padded_vocab_size
from megatron_rlp.parallel.pipeline import chunks_of

TRACKER = "latest_checkpointed_iteration.txt"
_ITER = re.compile(r"^(iter_\d{7,}|release)$")


class MegatronLMError(ValueError):
    """A Megatron-LM checkpoint that cannot be used as asked (one line for the user)."""


# ---------------------------------------------------------------------------------------
# Finding and reading


def find(path: str | Path) -> Path | None:
    """The iteration directory of a Megatron-LM save dir or iteration dir; None if `path` is
    not Megatron-LM's layout.

    Raises:
        MegatronLMError: the tracker file is unreadable or names a missing directory, or the
            checkpoint is in the legacy `torch` format (per-rank `mp_rank_*` files).
    """
    p = Path(path)
    tracker = p / TRACKER
    if tracker.is_file():
        text = tracker.read_text(errors="replace").strip()
        if text == "release":
            ckpt = p / "release"
        elif text.isdigit():
            ckpt = p / f"iter_{int(text):07d}"
        else:
            raise MegatronLMError(f"{tracker} is corrupted (expected an iteration number or "
                                  f"'release', found {text[:40]!r})")
        if not ckpt.is_dir():
            raise MegatronLMError(f"{tracker} names {ckpt.name}, which does not exist in {p}")
    elif _ITER.match(p.name) and p.is_dir():
        ckpt = p
    else:
        return None
    if any(ckpt.glob("mp_rank_*")):
        raise MegatronLMError(f"{ckpt} is a legacy Megatron-LM 'torch' checkpoint; convert it "
                              "to torch_dist with Megatron-LM (--ckpt-convert-format torch_dist)")
    if not (ckpt / "metadata.json").is_file():
        raise MegatronLMError(f"Megatron-LM checkpoint {ckpt} is incomplete (no metadata.json)")
    return ckpt


def read_common(ckpt: Path) -> dict:
    """The common (non-sharded) state: `args`, `iteration`, `checkpoint_version`, ...
    Needs no process group."""
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    if not isinstance(common, dict) or not isinstance(common.get("args"), Namespace):
        raise MegatronLMError(f"{ckpt} has no saved Megatron-LM args (not a Megatron-LM "
                              "checkpoint, or written without them)")
    return common


# Saved args that change what the weights mean, and the value this project's model needs.
_REQUIRED = {
    "add_bias_linear": False, "add_qkv_bias": False, "layernorm_zero_centered_gamma": False,
    "apply_layernorm_1p": False, "multi_latent_attention": False,
    "mtp_num_layers": None, "rotary_percent": 1.0, "use_rope_scaling": False,
    "rotary_interleaved": False, "qk_l2_norm": False, "openai_gelu": False,
    "quick_geglu": False, "heterogeneous_layers_config_path": None,
}
# With --num-experts: MoE variants Megatron-LM has and this project's model does not build.
_REQUIRED_MOE = {
    "moe_latent_size": None, "moe_router_num_groups": None, "moe_router_group_topk": None,
    "moe_shared_expert_gate": False, "moe_apply_probs_on_input": False,
    "moe_mlp_glu_interleave_size": None, "moe_shared_expert_glu_interleave_size": None,
    "moe_router_force_load_balancing": False, "moe_pad_expert_input_to_capacity": False,
    "moe_use_upcycling": False,
}
# The routing args Megatron-LM's --use-checkpoint-args copies, under the same names here.
MOE_KEYS = ("num_experts", "moe_router_topk", "moe_ffn_hidden_size",
            "moe_shared_expert_intermediate_size", "moe_router_score_function",
            "moe_router_pre_softmax", "moe_router_topk_scaling_factor",
            "moe_router_enable_expert_bias")


def _moe_fields(a: dict, ffn: int) -> dict:
    """The MoE `ModelConfig` fields of saved args with `--num-experts` (None for dense)."""
    if not a.get("num_experts"):
        return {"num_experts": None}
    return {
        "num_experts": int(a["num_experts"]), "moe_router_topk": int(a["moe_router_topk"]),
        "moe_ffn_hidden_size": int(a.get("moe_ffn_hidden_size") or ffn),
        "moe_shared_expert_intermediate_size": a.get("moe_shared_expert_intermediate_size"),
        "moe_router_score_function": a.get("moe_router_score_function") or "softmax",
        "moe_router_pre_softmax": bool(a.get("moe_router_pre_softmax")),
        "moe_router_topk_scaling_factor": a.get("moe_router_topk_scaling_factor"),
        "moe_router_enable_expert_bias": bool(a.get("moe_router_enable_expert_bias")),
    }


def _gpt_pattern(a: dict) -> str:
    """`*-` per dense GPT layer, `*E` per MoE one (all MoE: `--moe-layer-freq 1`)."""
    layers = int(a["num_layers"])
    if not a.get("num_experts"):
        return "*-" * layers
    freq = a.get("moe_layer_freq", 1)
    moe = [i % freq == 0 for i in range(layers)] if isinstance(freq, int) else \
        [bool(x) for x in freq]
    if not all(moe):  # then TransformerBlock saves per layer, not GPT's stacked format
        raise MegatronLMError(f"the checkpoint's model uses what this project does not read: "
                              f"moe_layer_freq={freq!r} (a GPT checkpoint with dense and MoE "
                              "layers; allowed: 1, every layer MoE)")
    return "*E" * layers


def architecture(args: Namespace) -> tuple[dict, int, bool]:
    """Saved Megatron-LM args -> (`ModelConfig` fields, padded vocabulary rows, is_gpt).

    Raises:
        MegatronLMError: a feature this project's model does not build (biases, MoE, MLA,
            MTP, partial or scaled RoPE, learned positions, ...), naming the arg.
    """
    a = vars(args)
    required = {**_REQUIRED, **(_REQUIRED_MOE if a.get("num_experts") else {})}
    bad = [f"{k}={a[k]!r}" for k, want in required.items() if k in a and (
        bool(a[k]) if want in (False, None) else a[k] != want)]
    if a.get("position_embedding_type") not in ("rope", "none"):
        bad.append(f"position_embedding_type={a.get('position_embedding_type')!r}")
    if bad:
        raise MegatronLMError("the checkpoint's model uses what this project does not build: "
                              + ", ".join(bad))
    pattern = a.get("hybrid_layer_pattern") or a.get("hybrid_override_pattern")
    gpt = not pattern
    pattern = _gpt_pattern(a) if gpt else pattern.replace("|", "")
    hidden, heads = int(a["hidden_size"]), int(a["num_attention_heads"])
    head_dim = int(a.get("mamba_head_dim") or 64)
    fields = {
        "hybrid_layer_pattern": pattern,
        "hidden_size": hidden,
        "ffn_hidden_size": int(a.get("ffn_hidden_size") or 4 * hidden),
        "num_attention_heads": heads,
        "num_query_groups": int(a["num_query_groups"]) if a.get("group_query_attention")
        else heads,
        "kv_channels": int(a.get("kv_channels") or hidden // heads),
        "qk_layernorm": bool(a.get("qk_layernorm")),
        "activation": "swiglu" if a.get("swiglu") else
        "squared_relu" if a.get("squared_relu") else "gelu",
        "position_embedding_type": a["position_embedding_type"],
        "rotary_base": int(a.get("rotary_base") or 10000),
        "untie_embeddings_and_output_weights": bool(a.get("untie_embeddings_and_output_weights")),
        "normalization": a.get("normalization") or "LayerNorm",
        "norm_epsilon": float(a.get("layernorm_epsilon") or a.get("norm_epsilon") or 1e-5),
        "max_sequence_length": int(a.get("max_position_embeddings") or a.get("seq_length")),
        "mamba_num_heads": int(a.get("mamba_num_heads") or 2 * hidden // head_dim),
        "mamba_head_dim": head_dim,
        "mamba_state_dim": int(a.get("mamba_state_dim") or 128),
        "mamba_num_groups": int(a.get("mamba_num_groups") or 8),
    }
    fields.update(_moe_fields(a, fields["ffn_hidden_size"]))
    return fields, int(a["padded_vocab_size"]), gpt


def _relevant(pattern: str) -> set[str]:
    """Config keys that shape this pattern's weights (no Mamba sizes without `M` layers...)."""
    keys = {"hybrid_layer_pattern", "hidden_size", "normalization", "norm_epsilon",
            "untie_embeddings_and_output_weights"}
    if "*" in pattern:
        keys |= {"num_attention_heads", "num_query_groups", "kv_channels", "qk_layernorm",
                 "position_embedding_type"}
    if "-" in pattern:
        keys |= {"ffn_hidden_size", "activation"}
    if "M" in pattern:
        keys |= {"mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups"}
    if "E" in pattern:
        keys |= set(MOE_KEYS) | {"activation"}
    return keys


def _effective(model) -> dict:
    """The configured model with its derived defaults filled in, like `architecture`'s."""
    fields = {k: getattr(model, k) for k in (
        "hybrid_layer_pattern", "hidden_size", "ffn_hidden_size", "num_attention_heads",
        "num_query_groups", "kv_channels", "qk_layernorm", "activation",
        "position_embedding_type", "rotary_base", "untie_embeddings_and_output_weights",
        "normalization", "norm_epsilon", "mamba_num_heads", "mamba_head_dim",
        "mamba_state_dim", "mamba_num_groups", *MOE_KEYS)}
    fields["hybrid_layer_pattern"] = fields["hybrid_layer_pattern"].replace("|", "")
    fields["moe_ffn_hidden_size"] = fields["moe_ffn_hidden_size"] or model.ffn_hidden_size
    fields["kv_channels"] = fields["kv_channels"] or model.hidden_size // model.num_attention_heads
    fields["mamba_num_heads"] = (fields["mamba_num_heads"]
                                 or 2 * model.hidden_size // model.mamba_head_dim)
    return fields


def mismatches(model, vocab_size: int, args: Namespace) -> list[str]:
    """`key=saved (config: configured)` for every architecture key that differs."""
    saved, rows, _ = architecture(args)
    mine = _effective(model)
    keys = _relevant(saved["hybrid_layer_pattern"]) | _relevant(mine["hybrid_layer_pattern"])
    if "*" in saved["hybrid_layer_pattern"] and saved["position_embedding_type"] == "rope":
        keys.add("rotary_base")
    diff = [f"model.{k}={saved.get(k)!r} (config: {mine[k]!r})" for k in sorted(keys)
            if saved.get(k) != mine[k]]
    padded = padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by)
    if padded != rows:
        diff.append(f"padded vocabulary {rows} rows (config: {padded}; set "
                    f"model.make_vocab_size_divisible_by={rows} and a data.tokenizer of at "
                    f"most {rows} ids)")
    return diff


def apply_checkpoint_args(cfg) -> None:
    """`train.use_checkpoint_args`: take the model section from the Megatron-LM checkpoint
    named by `train.load` (before torch.distributed starts). The configured pattern's `|`
    pipeline splits are kept when the layers are the same; the embedding keeps exactly the
    saved rows (`make_vocab_size_divisible_by` = padded vocabulary).

    Raises:
        MegatronLMError: `train.load` is not a Megatron-LM checkpoint, or uses a feature
            this project does not build.
    """
    ckpt = find(cfg.train.load) if cfg.train.load else None
    if ckpt is None:
        raise MegatronLMError(f"train.use_checkpoint_args=true needs train.load to be a "
                              f"Megatron-LM checkpoint (with {TRACKER} or an iter_* dir), "
                              f"got {cfg.train.load!r}")
    fields, rows, _ = architecture(read_common(ckpt)["args"])
    if cfg.model.hybrid_layer_pattern.replace("|", "") == fields["hybrid_layer_pattern"]:
        fields["hybrid_layer_pattern"] = cfg.model.hybrid_layer_pattern
    for key, value in fields.items():
        setattr(cfg.model, key, value)
    cfg.model.make_vocab_size_divisible_by = rows


# ---------------------------------------------------------------------------------------
# Loading into a training state


def _drop_extra_state(sharded: dict) -> None:
    """Keep `_extra_state` entries local: the local spec's are empty, and a TE run's FP8
    metadata has no meaning for these modules."""
    def keep_local(entry):
        if isinstance(entry, ShardedBase) and entry.key.endswith("._extra_state"):
            return LocalNonpersistentObject(entry.data)
        return entry

    dict_list_map_inplace(keep_local, sharded)


def policy_sharded_state_dict(policy, pattern: str, gpt: bool) -> list[dict]:
    """Per pipeline chunk, the policy's sharded state dict under Megatron-LM's keys (no
    prefix, TE names; a GPT checkpoint's stacked layer format when `gpt`)."""
    chunks = []
    for chunk in chunks_of(policy):
        sd = chunk.sharded_state_dict()
        _drop_extra_state(sd)
        if gpt:
            retarget_sharded_state_dict_to_gpt_checkpoint(sd, gpt_compatible_layer_maps(pattern))
        chunks.append(sd)
    return chunks


def load_policy(state, ckpt: Path) -> str:
    """Warm-start `state.policy` from a Megatron-LM checkpoint (collective). The step stays 0
    and the teacher uninitialised (copied from the policy at the first step).

    Returns:
        A line for the log.

    Raises:
        MegatronLMError: the configured model does not fit the checkpoint (every mismatch
            named), or its tensors cannot be read.
    """
    common = read_common(ckpt)
    args = common["args"]
    diff = mismatches(state.cfg.model, state.tokenizer.vocab_size, args)
    if diff:
        raise MegatronLMError(f"Megatron-LM checkpoint {ckpt} does not fit the configured "
                              f"model: {'; '.join(diff)} (or set train.use_checkpoint_args=true)")
    _, _, gpt = architecture(args)
    pattern = state.cfg.model.hybrid_layer_pattern
    chunks = policy_sharded_state_dict(state.policy, pattern, gpt)
    for sd in chunks:
        names.match_checkpoint_names(sd, ckpt)  # a local-spec run without the TE key map
    with torch.no_grad():
        try:
            loaded = dist_checkpointing.load({f"chunk{i}": sd for i, sd in enumerate(chunks)},
                                             str(ckpt))
        except Exception as e:  # noqa: BLE001 - one line for the user, whatever the cause
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise MegatronLMError(f"cannot read Megatron-LM checkpoint {ckpt}: "
                                  f"{type(e).__name__}: {first}") from None
        for i, chunk in enumerate(chunks_of(state.policy)):
            chunk.load_state_dict(loaded[f"chunk{i}"])
    kind = "GPT" if gpt else "hybrid"
    return (f"warm-started the policy from a Megatron-LM {kind} checkpoint (iteration "
            f"{common.get('iteration')}); teacher from the policy, optimizer fresh, step 0")
