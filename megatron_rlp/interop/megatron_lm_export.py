"""Write the RLP policy as a Megatron-LM `torch_dist` checkpoint, with Megatron-LM's own code.

    python tools/convert_checkpoint.py megatron-to-megatron-lm --checkpoint runs/rlp \
        --out runs/rlp_mlm [--layout hybrid|gpt] [--weights teacher]

writes `OUT/latest_checkpointed_iteration.txt` and `OUT/iter_NNNNNNN/` through
`megatron.training.checkpointing.save_checkpoint`: the files, the tracker and the common state
(`args`, `iteration`, `checkpoint_version`) are exactly what a Megatron-LM run writes. The
`args` come from Megatron-LM's own argument parser, given the flags that describe this
project's model (`megatron_lm_argv`), so a Megatron-LM run reads them with
`--use-checkpoint-args` or checks them against its own flags. Parameter names are TE's.

Layouts:
- `hybrid` (default): a HybridModel checkpoint (`pretrain_hybrid.py` / `pretrain_mamba.py`
  with `--hybrid-layer-pattern`), for every pattern, dense ones included.
- `gpt`: for patterns `*-` or `*E` repeated, a GPTModel checkpoint (`pretrain_gpt.py`, with
  `--num-experts` for `*E`): layer tensors stacked along a leading layer axis and
  `decoder.final_layernorm`, via Megatron's own `gpt_checkpoint_interop` retargeting (the
  inverse of how it reads GPT into hybrid runs).

MoE models carry their experts under Megatron-LM's keys (interop/megatron_lm.py) and their
routing as Megatron-LM flags (`--num-experts`, `--moe-router-topk`, ...; `moe_argv`).

Megatron-LM's `load_checkpoint` continues from it (tested on CPU with the local spec;
`--finetune` or `--no-load-optim --no-load-rng`, since only the model is stored). A TE-spec
run additionally looks for TE's `_extra_state` entries (FP8 metadata), which a policy trained
without TE has not got: load with `--dist-ckpt-strictness log_unexpected`, which leaves them
at their defaults.
"""

from __future__ import annotations

import contextlib
import io
import queue
import sys
from argparse import Namespace
from pathlib import Path

import torch

# Imported here, not where used: Megatron's modules run torch.compile decorators at import,
# which must happen before the CPU backend patches torch.cuda (backends/cpu.py).
from megatron.training import arguments, checkpointing, global_vars

from megatron_rlp.models.provider import num_layers

# How the export is stored, not what the model is (not among the flags shown to the user).
_STORAGE_FLAGS = ("--ckpt-format", "torch_dist", "--micro-batch-size", "1", "--no-save-optim",
                  "--no-save-rng")


def megatron_lm_argv(model, rows: int, gpt: bool) -> list[str]:
    """Megatron-LM command-line flags that describe `model` (a `ModelConfig`) with `rows`
    embedding rows (`gpt`: as a GPTModel, else a HybridModel with the pattern). Mamba sizes
    only for patterns with `M` layers (as interop/megatron_lm.py compares them only there);
    join them with `shlex.join` to show them (a pattern's `*` is a shell glob)."""
    m = model
    pattern = m.hybrid_layer_pattern.replace("|", "")
    kv = m.kv_channels or m.hidden_size // m.num_attention_heads
    argv = [
        "--num-layers", str(pattern.count("*") if gpt else num_layers(pattern)),
        "--hidden-size", str(m.hidden_size), "--ffn-hidden-size", str(m.ffn_hidden_size),
        "--num-attention-heads", str(m.num_attention_heads), "--kv-channels", str(kv),
        "--group-query-attention", "--num-query-groups", str(m.num_query_groups),
        "--normalization", m.normalization, "--norm-epsilon", str(m.norm_epsilon),
        "--position-embedding-type", m.position_embedding_type,
        "--rotary-base", str(m.rotary_base),
        "--seq-length", str(m.max_sequence_length),
        "--max-position-embeddings", str(m.max_sequence_length),
        "--disable-bias-linear",
        "--make-vocab-size-divisible-by", str(m.make_vocab_size_divisible_by),
    ]
    argv += {"swiglu": ["--swiglu"], "squared_relu": ["--squared-relu"], "gelu": []}[m.activation]
    if m.qk_layernorm:
        argv.append("--qk-layernorm")
    if m.untie_embeddings_and_output_weights:
        argv.append("--untie-embeddings-and-output-weights")
    if not gpt:
        argv += ["--is-hybrid-model", "--hybrid-layer-pattern", pattern]
    if not gpt and "M" in pattern:
        heads = m.mamba_num_heads or 2 * m.hidden_size // m.mamba_head_dim
        argv += ["--mamba-num-heads", str(heads), "--mamba-head-dim", str(m.mamba_head_dim),
                 "--mamba-state-dim", str(m.mamba_state_dim),
                 "--mamba-num-groups", str(m.mamba_num_groups)]
    return argv + moe_argv(m, pattern)


def moe_argv(m, pattern: str) -> list[str]:
    """Megatron-LM's MoE flags for `model.*` MoE keys (none without `E` layers): the
    routing (`--use-checkpoint-args` copies it) and the router losses and dtype (it does not;
    recorded so that a continued run can reuse them)."""
    if "E" not in pattern:
        return []
    argv = ["--num-experts", str(m.num_experts), "--moe-router-topk", str(m.moe_router_topk),
            "--moe-ffn-hidden-size", str(m.moe_ffn_hidden_size or m.ffn_hidden_size),
            "--moe-router-score-function", m.moe_router_score_function,
            "--moe-router-load-balancing-type", m.moe_router_load_balancing_type,
            "--moe-aux-loss-coeff", str(m.moe_aux_loss_coeff),
            "--moe-token-dispatcher-type", m.moe_token_dispatcher_type]
    optional = (("--moe-shared-expert-intermediate-size", m.moe_shared_expert_intermediate_size),
                ("--moe-router-topk-scaling-factor", m.moe_router_topk_scaling_factor),
                ("--moe-z-loss-coeff", m.moe_z_loss_coeff),
                ("--moe-router-dtype", m.moe_router_dtype),
                ("--moe-expert-capacity-factor", m.moe_expert_capacity_factor))
    argv += [x for flag, value in optional if value is not None for x in (flag, str(value))]
    if m.moe_router_pre_softmax:
        argv.append("--moe-router-pre-softmax")
    if m.moe_router_enable_expert_bias:
        argv += ["--moe-router-enable-expert-bias",
                 "--moe-router-bias-update-rate", str(m.moe_router_bias_update_rate)]
    return argv


# validate_args wants a training setup; these values never reach a model and Megatron-LM's
# `--use-checkpoint-args` copies only model and tokenizer args.
_RUN_FLAGS = ["--save-interval", "1", "--train-iters", "1", "--lr", "0.0"]


def parse_megatron_lm_args(argv: list[str]) -> Namespace:
    """Megatron-LM's own `parse_args` + `validate_args` over `argv` (derived args such as
    `kv_channels`, `params_dtype`, `use_dist_ckpt` filled in as a Megatron-LM run has them)."""
    saved = sys.argv
    sys.argv = ["megatron-rlp", *argv, *_RUN_FLAGS]
    try:
        args = arguments.parse_args()
    finally:
        sys.argv = saved
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every setting
        arguments.validate_args(args)
    return args


def save_with_megatron_lm(models: list, args: Namespace, iteration: int) -> Path:
    """`megatron.training.checkpointing.save_checkpoint` of `models` (one per pipeline chunk;
    collective) into `args.save`; returns the iteration directory."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # Megatron's writer collects thread results through a multiprocessing Manager (a spawned
    # server process); a plain queue serves its threads (shared/MEGATRON_CPU.md).
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    global_vars.set_args(args)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            checkpointing.save_checkpoint(iteration, models, None, None, 0)
    finally:
        global_vars.set_args(None)
    return Path(args.save) / f"iter_{iteration:07d}"


class AsGPTCheckpoint(torch.nn.Module):
    """A `*-*-...` HybridModel whose sharded state dict has GPTModel's checkpoint layout."""

    def __init__(self, model: torch.nn.Module, pattern: str):
        super().__init__()
        self.model = model
        self.pattern = pattern

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        from megatron.core.dist_checkpointing.gpt_checkpoint_interop import (
            gpt_compatible_layer_maps,
            retarget_sharded_state_dict_to_gpt_checkpoint,
        )

        sd = self.model.sharded_state_dict(prefix, sharded_offsets, metadata)
        retarget_sharded_state_dict_to_gpt_checkpoint(sd, gpt_compatible_layer_maps(self.pattern))
        return sd


def export_model(model: torch.nn.Module, model_cfg, out_dir: str | Path, iteration: int,
                 layout: str = "hybrid") -> tuple[Path, list[str]]:
    """Save a TP=1/PP=1 `model` (its `ModelConfig` `model_cfg`) as a Megatron-LM checkpoint
    under `out_dir` (Megatron's process groups must be set up).

    Returns:
        The iteration directory and the Megatron-LM model flags that describe it (a
        Megatron-LM run needs some of them even with `--use-checkpoint-args`, which does not
        copy e.g. `--qk-layernorm` or `--norm-epsilon`).

    Raises:
        ValueError: `layout="gpt"` for a pattern that is not `*-` or `*E` repeated.
    """
    pattern = model_cfg.hybrid_layer_pattern.replace("|", "")
    gpt = layout == "gpt"
    if gpt and pattern not in ("*-" * (len(pattern) // 2), "*E" * (len(pattern) // 2)):
        raise ValueError(f"--layout gpt needs a pattern of '*-' or '*E' repeated (a GPT layer "
                         f"is attention then an MLP or MoE), not {pattern!r}; use --layout "
                         "hybrid")
    rows = int(model.embedding.word_embeddings.weight.shape[0])
    flags = megatron_lm_argv(model_cfg, rows, gpt)
    args = parse_megatron_lm_args([*flags, *_STORAGE_FLAGS, "--save", str(out_dir)])
    args.padded_vocab_size = rows
    args.iteration = iteration
    args.world_size = 1
    out = save_with_megatron_lm([AsGPTCheckpoint(model, pattern) if gpt else model], args,
                                iteration)
    return out, flags


def export_megatron_lm(path: str | Path, out_dir: str | Path, layout: str = "hybrid",
                       weights: str = "policy", iteration: int | None = None
                       ) -> tuple[Path, list[str]]:
    """Export a project checkpoint (a `train.save` root or a step dir; any layout it was
    trained with) as a Megatron-LM checkpoint. One process, CPU.

    Args:
        layout: "hybrid" (HybridModel) or "gpt" (GPTModel; `*-` repeated patterns).
        weights: "policy" or "teacher" (the EMA copy).
        iteration: the iteration to record; default the checkpoint's step.

    Returns:
        The iteration directory written and the Megatron-LM model flags (`export_model`).
    """
    from megatron_rlp.config import RunConfig
    from megatron_rlp.convert.checkpoints import _megatron, _run_config, load_megatron

    with _megatron(RunConfig()):
        model, fields, common = load_megatron(path, weights)
        cfg = _run_config(fields)
        # load_megatron builds exactly the saved rows (divisible by 1); record the run's own
        # padding unit, which Megatron-LM multiplies by its TP when it pads a tokenizer.
        saved_model = (common.get("config") or {}).get("model") or {}
        cfg.model.make_vocab_size_divisible_by = int(
            saved_model.get("make_vocab_size_divisible_by") or 128)
        step = int(common.get("step") or 0) if iteration is None else iteration
        return export_model(model, cfg.model, out_dir, step, layout)
