"""Compatibility of a checkpoint with this run, decided once as a `LoadPlan`: what a load
restores (policy only, or the whole training state: optimizer, schedule, teacher, reference,
RNG) and what it refuses, with one line that names the setting to change.

Megatron functions used: none; the plan reads the common state `save_checkpoint` wrote
(`dist_checkpointing.load_common_state_dict`) and this run's layout and optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_rlp.checkpoint.errors import CheckpointError
from megatron_rlp.checkpoint.layout import current_layout, fmt_layout
from megatron_rlp.checkpoint.optimizer import optimizer_kind
from megatron_rlp.models.vocab import padded_vocab_size
from megatron_rlp.train.resume import ResumeOptions

if TYPE_CHECKING:
    from megatron_rlp.train.builder import TrainState

# Model config keys that change parameter shapes or names, or the function the weights
# compute (RoPE's theta, the norms' epsilon): a checkpoint must match every one of them, on
# resume and on a warm start. The other `model` fields do not change the function of loaded
# weights: `name`; `max_sequence_length` (RoPE is the same at every position it covers);
# `init_method_std` (initialisation only); `make_vocab_size_divisible_by` (checked as
# `padded_vocab_size`; padding rows are never sampled nor scored); `transformer_impl` and
# `packed_attention` (the same layers through other kernels, Megatron's TE/local names mapped).
ARCH_KEYS = ("hybrid_layer_pattern", "hidden_size", "ffn_hidden_size", "num_attention_heads",
             "num_query_groups", "kv_channels", "qk_layernorm", "activation", "normalization",
             "norm_epsilon", "untie_embeddings_and_output_weights", "position_embedding_type",
             "rotary_base", "mamba_num_heads", "mamba_head_dim", "mamba_state_dim",
             "mamba_num_groups",
             # MoE: the expert tensors' shapes and the routing the weights were trained with
             "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
             "moe_router_topk", "moe_router_score_function", "moe_router_pre_softmax",
             "moe_router_topk_scaling_factor", "moe_router_enable_expert_bias")


def model_signature(state: TrainState) -> dict:
    """The model settings (ARCH_KEYS, padded vocab) a checkpoint's tensors depend on."""
    m = state.cfg.model
    sig = {k: getattr(m, k) for k in ARCH_KEYS}
    sig["hybrid_layer_pattern"] = m.hybrid_layer_pattern.replace("|", "")
    sig["padded_vocab_size"] = padded_vocab_size(state.tokenizer.vocab_size,
                                                 m.make_vocab_size_divisible_by)
    return sig


@dataclass(frozen=True)
class LoadPlan:
    """What `load_checkpoint` restores from one checkpoint into one run. The policy weights
    always load; everything else only with `resume` (same objective, not a fine-tune).

    Attributes:
        objective: the checkpoint's training objective.
        resume: restore the training state (step, schedule, counters), else warm-start.
        finetune: a warm start asked for by `train.finetune`.
        teacher / reference: restore the EMA teacher / the KL reference policy.
        rng: restore every rank's RNG states (same layout, `train.load_rng`).
        optimizer: the saved optimizer kind to restore ("local", "distributed/<format>"),
            or None: a fresh Adam state.
        override_scheduler: the configured lr schedule applies from the loaded step.
        layout / same_layout: the checkpoint's parallel layout, and whether it is this run's.
    """

    objective: str | None
    resume: bool
    finetune: bool
    teacher: bool
    reference: bool
    rng: bool
    optimizer: str | None
    override_scheduler: bool
    layout: dict | None
    same_layout: bool
    teacher_note: str = ""  # an EMA teacher saved but not built, or built but not saved

    def message(self) -> str:
        """A line for the log: "resumed ..." or "warm-started ..."."""
        if not self.resume:
            if self.finetune:
                return (f"fine-tuning from the policy weights of a {self.objective} "
                        "checkpoint (train.finetune: step 0, fresh optimizer)")
            return f"warm-started the policy (a {self.objective} checkpoint)"
        note = "" if self.same_layout else (
            f" into a new layout ({fmt_layout(self.layout)} -> {fmt_layout(current_layout())}; "
            "RNG states kept from train.seed)")
        if not self.optimizer:
            note += " (weights, teacher and schedule; fresh optimizer state: train.load_optimizer)"
        return f"resumed{note}{self.teacher_note}"


def plan_load(common: dict, state: TrainState, ckpt: Path, options: ResumeOptions) -> LoadPlan:
    """Decide what loading checkpoint `ckpt` (its common state `common`) into `state` restores.

    Raises:
        CheckpointError: the checkpoint does not fit: another model shape or vocab, no KL
            reference for a KL run, another optimizer kind, a `dp_reshardable` optimizer
            state into another TP/PP, or another params dtype for the optimizer state.
    """
    _check_model(common, state, ckpt)
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
    # rlp.teacher_scoring across a resume (scoring/ema_teacher.py): S_ema never changes the
    # update, so either way round is handled, said in the load line.
    teacher_note = ""
    saved_teacher = bool(common.get("teacher_initialized"))
    if resume and state.cfg.train.objective == "rlp":
        if saved_teacher and state.teacher is None:
            teacher_note = ("; its EMA teacher is not loaded (rlp.teacher_scoring=off builds "
                            "none)")
        elif not saved_teacher and state.teacher is not None and common.get("step", 0):
            teacher_note = ("; it holds no EMA teacher (saved with rlp.teacher_scoring=off): "
                            "the teacher restarts as a copy of the policy at the next step")
    layout = common.get("layout")
    same_layout = layout == current_layout()
    optimizer = None
    if resume and options.load_optimizer and common.get("optimizer_saved", True):
        optimizer = common.get("optimizer_kind") or "local"  # format 1: local optimizer only
        _check_optimizer(optimizer, state, ckpt, layout)
        _check_precision(common, state, ckpt)
    return LoadPlan(objective=common.get("objective"), resume=resume,
                    finetune=options.finetune, teacher=teacher, reference=reference,
                    rng=resume and same_layout and options.load_rng, optimizer=optimizer,
                    override_scheduler=options.override_scheduler, layout=layout,
                    same_layout=same_layout, teacher_note=teacher_note)


def _check_model(common: dict, state: TrainState, ckpt: Path) -> None:
    # Keys a signature lacks (format 1 had none; rotary_base and norm_epsilon came later) are
    # read from the saved config's model section.
    model = (common.get("config") or {}).get("model", {})
    saved = {k: model[k] for k in ARCH_KEYS if k in model}
    if "hybrid_layer_pattern" in saved:
        saved["hybrid_layer_pattern"] = saved["hybrid_layer_pattern"].replace("|", "")
    saved.update(common.get("model_signature") or {})
    mine = model_signature(state)
    diff = [k for k in mine if k in saved and saved[k] != mine[k]]
    if diff:
        shown = ", ".join(f"{k}={saved[k]!r} (config: {mine[k]!r})" for k in diff)
        if diff == ["padded_vocab_size"]:
            raise CheckpointError(f"checkpoint {ckpt} does not fit the configured model: "
                                  f"{shown}; check data.tokenizer settings")
        fix = " ".join(f"model.{k}={saved[k]}" for k in diff if k != "padded_vocab_size")
        yaml_file = ckpt.parent / "model.yaml"  # written by convert_checkpoint hf-to-megatron
        where = (f", or add its model section as a second config: --config RUN.yaml --config "
                 f"{yaml_file}" if yaml_file.is_file() else "")
        where += ", or train.use_checkpoint_args=true (the model section saved with it)"
        vocab = " (and check data.tokenizer)" if "padded_vocab_size" in diff else ""
        raise CheckpointError(f"checkpoint {ckpt} does not fit the configured model: {shown}; "
                              f"set {fix}{vocab}{where}")


def _check_optimizer(saved: str, state: TrainState, ckpt: Path, layout: dict | None) -> None:
    mine = optimizer_kind(state, "")
    if saved.split("/")[0] != mine.split("/")[0]:
        was = "true" if saved.startswith("distributed") else "false"
        raise CheckpointError(f"checkpoint {ckpt} holds {saved.split('/')[0]} optimizer state: "
                              f"resume with parallel.use_distributed_optimizer={was}")
    saved_ep, now_ep = (layout or {}).get("ep", 1), current_layout().get("ep", 1)
    if (saved_ep > 1) != (now_ep > 1):
        # Megatron chains a dense and an expert optimizer under EP > 1, one optimizer at EP=1.
        raise CheckpointError(
            f"checkpoint {ckpt} holds optimizer state of EP={saved_ep} (Megatron keeps expert "
            f"parameters in {'a separate' if saved_ep > 1 else 'the same'} optimizer), which "
            f"does not load at EP={now_ep}: resume with "
            f"parallel.expert_model_parallel_size={saved_ep}, or with "
            "train.load_optimizer=false (weights, teacher and schedule load in any EP)")
    moved = {k: (layout or {}).get(k) for k in ("tp", "pp", "vp")} != {
        k: current_layout().get(k) for k in ("tp", "pp", "vp")}
    if saved == "distributed/dp_reshardable" and moved:
        raise CheckpointError(
            f"checkpoint {ckpt} holds distributed-optimizer state in the dp_reshardable format, "
            f"which loads only with the same TP/PP ({fmt_layout(layout)}, now "
            f"{fmt_layout(current_layout())}); re-save it in the old layout with "
            "train.dist_optimizer_checkpoint=fully_reshardable (same train.steps, another "
            "train.save), then load that")


def _check_precision(common: dict, state: TrainState, ckpt: Path) -> None:
    """fp32 and bf16 runs keep different optimizer states (bf16: fp32 main weights), so Adam
    state does not move between them; the weights do."""
    saved_dtype = ((common.get("config") or {}).get("precision") or {}).get("params_dtype")
    now_dtype = state.cfg.precision.params_dtype
    if saved_dtype and saved_dtype != now_dtype:
        raise CheckpointError(
            f"checkpoint {ckpt} was trained with precision.params_dtype={saved_dtype}; its "
            f"optimizer state does not load into a {now_dtype} run: keep "
            f"precision.params_dtype={saved_dtype}, or set train.load_optimizer=false "
            "(the weights load in either precision; Adam starts fresh)")
