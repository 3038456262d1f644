"""One typed config for a run: dataclass sections, a YAML file, `section.key=value` overrides.

Validation happens here, before `torch.distributed` starts, so a bad value costs one line
naming the key, the value and what is allowed (`ConfigError`), never a traceback from deep
inside Megatron. Parallel sizes use Megatron's own key names.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem, phrased for the user: key, value, what is allowed."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config: {key}={value!r} (allowed: {allowed})")


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture. Dense Qwen3-style models are HybridModel patterns of `*` (attention) and
    `-` (MLP) layers; `M` adds Mamba-2 layers (hybrid models)."""

    name: str = "tiny"
    hybrid_layer_pattern: str = "*-*-*-*-"
    hidden_size: int = 192
    ffn_hidden_size: int = 512
    num_attention_heads: int = 6
    num_query_groups: int = 2
    kv_channels: int | None = None  # head dim; None = hidden_size // num_attention_heads
    qk_layernorm: bool = True
    activation: Literal["swiglu", "squared_relu", "gelu"] = "swiglu"
    position_embedding_type: Literal["rope", "none"] = "rope"
    rotary_base: int = 1_000_000
    untie_embeddings_and_output_weights: bool = False
    max_sequence_length: int = 512
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-6
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 64
    # Mamba-2 mixer (used by `M` layers only); Megatron's conv width 4 and chunk 128 apply
    mamba_num_heads: int | None = None  # None = 2 * hidden_size / mamba_head_dim
    mamba_head_dim: int = 64
    mamba_state_dim: int = 128
    mamba_num_groups: int = 8

    def validate(self) -> None:
        pat = self.hybrid_layer_pattern
        # `E` (MoE) and the other HybridModel kinds need layer specs this package does not ship.
        _check(set(pat) <= set("M*-|") and any(c in "M*-" for c in pat) and "||" not in pat,
               "model.hybrid_layer_pattern", pat,
               "a non-empty string of M (Mamba-2), * (attention) and - (MLP) layers, "
               "| between pipeline stages")
        if "M" in pat:
            self._validate_mamba()
        for key in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                    "max_sequence_length", "make_vocab_size_divisible_by"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v > 0, f"model.{key}", v, "a positive integer")
        heads = self.num_attention_heads
        _check(heads % self.num_query_groups == 0, "model.num_query_groups",
               self.num_query_groups, f"a divisor of num_attention_heads={heads}")
        _check(self.kv_channels is None or self.kv_channels > 0, "model.kv_channels",
               self.kv_channels, "a positive integer or null")
        if self.kv_channels is None:
            _check(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
                   self.hidden_size, "a multiple of num_attention_heads (or set kv_channels)")
        _check(self.norm_epsilon > 0, "model.norm_epsilon", self.norm_epsilon, "> 0")
        _check(self.init_method_std > 0, "model.init_method_std", self.init_method_std, "> 0")

    def mamba_heads(self) -> int:
        """Mamba-2 heads: `mamba_num_heads`, or Megatron's default 2 * hidden / head_dim."""
        if self.mamba_num_heads is not None:
            return self.mamba_num_heads
        return 2 * self.hidden_size // self.mamba_head_dim

    def _validate_mamba(self) -> None:
        for key in ("mamba_head_dim", "mamba_state_dim", "mamba_num_groups"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v > 0, f"model.{key}", v, "a positive integer")
        if self.mamba_num_heads is None:
            _check(2 * self.hidden_size % self.mamba_head_dim == 0, "model.mamba_head_dim",
                   self.mamba_head_dim, f"a divisor of 2 * hidden_size={2 * self.hidden_size} "
                   "(or set mamba_num_heads)")
        else:
            _check(self.mamba_num_heads > 0, "model.mamba_num_heads", self.mamba_num_heads,
                   "a positive integer or null")
        heads = self.mamba_heads()
        _check(heads % self.mamba_num_groups == 0, "model.mamba_num_groups",
               self.mamba_num_groups, f"a divisor of the {heads} Mamba heads")


@dataclass(kw_only=True)
class ParallelConfig:
    """Megatron parallel layout. Data parallel size is world_size / (TP * PP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Interleaved pipeline: each rank holds this many model chunks (null = one). The layer
    # pattern names the PP x VP chunks with `|`; chunk i of rank r is segment i*PP + r.
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False

    def validate(self) -> None:
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v >= 1, f"parallel.{key}", v, "an integer >= 1")
        vp = self.virtual_pipeline_model_parallel_size
        _check(vp is None or (isinstance(vp, int) and vp >= 2 and
                              self.pipeline_model_parallel_size >= 2),
               "parallel.virtual_pipeline_model_parallel_size", vp,
               "null, or an integer >= 2 with pipeline_model_parallel_size >= 2")
        _check(not self.sequence_parallel or self.tensor_model_parallel_size > 1,
               "parallel.sequence_parallel", self.sequence_parallel,
               "true only with tensor_model_parallel_size > 1")


@dataclass(kw_only=True)
class RLPConfig:
    """The RLP objective (see RLP.md): G thoughts per context, info-gain reward, clipped
    surrogate, EMA teacher."""

    contexts_per_step: int = 8  # B, global over data-parallel ranks
    group_size: int = 4  # G thoughts per context
    positions_per_document: int = 1  # contexts drawn from one document
    max_thought_tokens: int = 16  # L_think, `</think>` included
    temperature: float = 0.7
    top_p: float = 1.0
    ema_decay: float = 0.999  # tau
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    min_prefix_tokens: int = 16
    max_prefix_tokens: int = 192  # max context length: the prefixes of one document share
    # one window of at most this many tokens
    # Where in a document the contexts are (data/contexts.py): `uniform` random positions,
    # `stride` every `position_stride` tokens (random phase), `entropy` the positions where the
    # EMA teacher's next-token distribution has the highest entropy (one teacher forward).
    position_strategy: Literal["uniform", "stride", "entropy"] = "uniform"
    position_stride: int = 64
    # Never target a `<think>`/`</think>` marker or a token inside a span the corpus carries.
    skip_thought_spans: bool = True
    # Contexts sampled together in one rollout batch (rows = this x group_size); 0 = all of
    # the rank's contexts at once. Smaller chunks bound the KV/SSM cache of a rollout.
    rollout_chunk_contexts: int = 0
    # One forward per document window serves all its positions and thoughts: the rollout
    # prefills each window once, the update packs a document's (position, thought) branches
    # after its window with a tree mask (megatron_rlp/packing). Same thoughts, rewards and loss
    # as the per-context path (false), which stays as the reference. Models with Mamba layers
    # keep the per-context update.
    share_prefixes: bool = True

    def validate(self) -> None:
        _check(isinstance(self.rollout_chunk_contexts, int) and self.rollout_chunk_contexts >= 0,
               "rlp.rollout_chunk_contexts", self.rollout_chunk_contexts,
               "an integer >= 0 (0 = all contexts in one rollout batch)")
        _check(isinstance(self.group_size, int) and self.group_size >= 2, "rlp.group_size",
               self.group_size, "an integer >= 2 (group advantages need a baseline)")
        for key in ("contexts_per_step", "positions_per_document", "max_thought_tokens",
                    "min_prefix_tokens", "max_prefix_tokens"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v >= 1, f"rlp.{key}", v, "an integer >= 1")
        _check(self.contexts_per_step % self.positions_per_document == 0,
               "rlp.positions_per_document", self.positions_per_document,
               f"a divisor of contexts_per_step={self.contexts_per_step}")
        _check(0 < self.temperature < math.inf, "rlp.temperature", self.temperature,
               "a finite number > 0")
        _check(0 < self.top_p <= 1, "rlp.top_p", self.top_p, "in (0, 1]")
        _check(0 <= self.ema_decay < 1, "rlp.ema_decay", self.ema_decay, "in [0, 1)")
        _check(0 <= self.clip_eps_low < 1, "rlp.clip_eps_low", self.clip_eps_low, "in [0, 1)")
        _check(self.clip_eps_high >= 0, "rlp.clip_eps_high", self.clip_eps_high, ">= 0")
        _check(self.min_prefix_tokens <= self.max_prefix_tokens, "rlp.min_prefix_tokens",
               self.min_prefix_tokens, f"<= max_prefix_tokens={self.max_prefix_tokens}")
        _check(isinstance(self.position_stride, int) and self.position_stride >= 1,
               "rlp.position_stride", self.position_stride, "an integer >= 1")
        band = self.max_prefix_tokens - self.min_prefix_tokens + 1  # positions one window holds
        need = self.positions_per_document
        if self.position_strategy == "stride":
            need = (self.positions_per_document - 1) * self.position_stride + 1
        _check(need <= band, "rlp.positions_per_document", self.positions_per_document,
               f"positions that fit one window of max_prefix_tokens - min_prefix_tokens + 1 = "
               f"{band} candidate positions ({need} needed with position_strategy="
               f"{self.position_strategy})")


@dataclass(kw_only=True)
class OptimizerConfig:
    """Adam(W) through Megatron's `get_megatron_optimizer`, with its lr scheduler."""

    lr: float = 1e-4
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def validate(self) -> None:
        _check(0 < self.lr < math.inf, "optimizer.lr", self.lr, "a finite number > 0")
        _check(0 <= self.min_lr <= self.lr, "optimizer.min_lr", self.min_lr, "in [0, lr]")
        _check(self.lr_warmup_steps >= 0, "optimizer.lr_warmup_steps", self.lr_warmup_steps,
               ">= 0")
        _check(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, ">= 0")
        for key in ("adam_beta1", "adam_beta2"):
            v = getattr(self, key)
            _check(0 <= v < 1, f"optimizer.{key}", v, "in [0, 1)")
        _check(self.adam_eps > 0, "optimizer.adam_eps", self.adam_eps, "> 0")
        _check(self.clip_grad >= 0, "optimizer.clip_grad", self.clip_grad, ">= 0 (0 = off)")


@dataclass(kw_only=True)
class DataConfig:
    """Where text comes from and how it is tokenized (docs/data_and_models.md).

    `corpus` is a JSONL/.txt file (tokenized at start-up) or the prefix of a Megatron indexed
    dataset (`PREFIX.bin` + `PREFIX.idx`, made by tools/preprocess_data.py). `blend` replaces
    it with several indexed datasets: `"0.7 PREFIX_A 0.3 PREFIX_B"` (weights, or no weights
    to blend by size), as one string or a YAML list. `split` cuts every dataset's documents
    into train/valid/test ranges, Megatron-style ("98,2,0").
    """

    corpus: str = "data/corpus.jsonl"
    blend: list[str] | None = None
    split: str = "100,0,0"  # train,valid,test weights over each dataset's documents
    cache_dir: str | None = None  # Megatron's dataset index cache; None = beside each prefix
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json (or its dir)
    ntp_seq_length: int = 128  # window length for `train.objective=ntp`
    ntp_batch_size: int = 16  # global sequences per NTP step

    def split_weights(self) -> list[float]:
        """`split` as three non-negative numbers (train, valid, test)."""
        parts = [p for p in self.split.replace(" ", "").split(",") if p]
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            weights = []
        ok = 1 <= len(weights) <= 3 and all(w >= 0 and math.isfinite(w) for w in weights)
        _check(ok and weights[0] > 0, "data.split", self.split,
               "up to three comma-separated weights train,valid,test with train > 0, e.g. 98,2,0")
        return weights + [0.0] * (3 - len(weights))

    def validate(self) -> None:
        _check(bool(self.corpus), "data.corpus", self.corpus,
               "a path to a .jsonl or .txt file, or an indexed-dataset prefix")
        if self.blend is not None:
            from megatron_rlp.data.indexed import BlendError, parse_blend

            try:
                prefixes, _ = parse_blend(self.blend)
            except BlendError as e:
                raise ConfigError(f"invalid config: data.blend={self.blend!r} (allowed: {e})"
                                  ) from None
            for prefix in prefixes:
                _check(Path(prefix + ".idx").is_file() and Path(prefix + ".bin").is_file(),
                       "data.blend", prefix, "indexed-dataset prefixes with .bin and .idx files "
                       "(tools/preprocess_data.py writes them)")
        self.split_weights()
        _check(self.tokenizer == "byte" or Path(self.tokenizer).exists(), "data.tokenizer",
               self.tokenizer, "'byte' or an existing tokenizer.json path")
        _check(self.ntp_seq_length >= 2, "data.ntp_seq_length", self.ntp_seq_length, ">= 2")
        _check(self.ntp_batch_size >= 1, "data.ntp_batch_size", self.ntp_batch_size, ">= 1")


@dataclass(kw_only=True)
class TrainConfig:
    """The loop: objective, steps, logging, checkpoints, and what ends a run early.

    Fault handling (docs/reliability.md): a step whose loss or gradient is not finite is
    skipped (no parameter, optimizer or teacher change) and counted; `max_consecutive_skips`
    in a row stop the run with an error. SIGTERM/SIGUSR1, `wall_time_limit_minutes` and
    `exit_interval` stop it cleanly: every rank saves at the next step boundary, exit code 0.
    """

    objective: Literal["rlp", "ntp"] = "rlp"
    steps: int = 20
    seed: int = 1234
    log_interval: int = 1
    metrics_file: str | None = None
    save: str | None = None  # checkpoint directory
    save_interval: int = 0  # 0 = only at the end (when `save` is set)
    keep_last: int = 0  # keep this many newest checkpoints under `save`; 0 = keep all
    checkpoint_checksums: bool = True  # SHA-256 manifest on save, verified on load
    # Distributed-optimizer state on disk: `dp_reshardable` (each rank writes its shards; loads
    # with any DP size, same TP/PP) or `fully_reshardable` (gathered per parameter over DP on
    # save; loads into any TP/PP/DP layout).
    dist_optimizer_checkpoint: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    load: str | None = None  # resume from (same objective) or warm-start (other objective)
    micro_batch_size: int = 0  # sequences per update micro-batch; 0 = all at once
    # Activation recomputation in the update (Megatron's): `selective` recomputes the core
    # attention (the seq^2 scores) in backward, `full` whole layers in groups of
    # `recompute_num_layers` (only their inputs are kept). Same gradients, less memory.
    recompute_granularity: Literal["none", "selective", "full"] = "none"
    recompute_num_layers: int = 1
    max_consecutive_skips: int = 5  # non-finite steps in a row before the run stops
    wall_time_limit_minutes: float = 0.0  # save and exit 0 after this long; 0 = no limit
    exit_interval: int = 0  # save and exit 0 after a step divisible by this; 0 = off
    # Held-out evaluation on the valid split (train/validate.py): next-token NLL without and
    # with a thought, every `eval_interval` steps (0 = never), on `eval_contexts` contexts.
    eval_interval: int = 0
    eval_contexts: int = 32
    # Logging (train/metrics.py): optional; a missing package is a notice, never an error.
    tensorboard_dir: str | None = None  # TensorBoard scalars (needs the tensorboard package)
    wandb_project: str | None = None  # Weights & Biases (needs wandb; WANDB_MODE=offline works)
    progress: bool = True  # rank 0: ETA column on console lines, a live bar on a terminal

    def validate(self) -> None:
        _check(self.steps >= 0, "train.steps", self.steps, "an integer >= 0")
        _check(self.log_interval >= 1, "train.log_interval", self.log_interval, ">= 1")
        _check(self.save_interval >= 0, "train.save_interval", self.save_interval, ">= 0")
        _check(self.keep_last >= 0, "train.keep_last", self.keep_last, ">= 0 (0 = keep all)")
        _check(self.micro_batch_size >= 0, "train.micro_batch_size", self.micro_batch_size,
               ">= 0")
        _check(self.recompute_num_layers >= 1, "train.recompute_num_layers",
               self.recompute_num_layers, "an integer >= 1")
        _check(self.max_consecutive_skips >= 1, "train.max_consecutive_skips",
               self.max_consecutive_skips, "an integer >= 1")
        _check(0 <= self.wall_time_limit_minutes < math.inf, "train.wall_time_limit_minutes",
               self.wall_time_limit_minutes, "a finite number >= 0 (0 = no limit)")
        _check(self.exit_interval >= 0, "train.exit_interval", self.exit_interval,
               ">= 0 (0 = off)")
        _check(self.eval_interval >= 0, "train.eval_interval", self.eval_interval, ">= 0 (0 = off)")
        _check(self.eval_contexts >= 1, "train.eval_contexts", self.eval_contexts, ">= 1")
        if self.save is not None:
            _check(bool(self.save) and not Path(self.save).is_file(), "train.save", self.save,
                   "a directory path (not an existing file)")
        if self.load is not None:
            _check(Path(self.load).is_dir(), "train.load", self.load,
                   "an existing checkpoint directory")
        if self.tensorboard_dir is not None:
            _check(bool(self.tensorboard_dir) and not Path(self.tensorboard_dir).is_file(),
                   "train.tensorboard_dir", self.tensorboard_dir,
                   "a directory path (not an existing file) or null")
        if self.wandb_project is not None:
            _check(bool(self.wandb_project.strip()) and "/" not in self.wandb_project,
                   "train.wandb_project", self.wandb_project, "a W&B project name or null")


@dataclass(kw_only=True)
class DeviceConfig:
    """`cpu` runs the real Megatron-Core code on CPU with gloo (see backends/cpu.py)."""

    type: Literal["cpu", "cuda"] = "cpu"
    num_threads: int = 0  # torch intra-op threads per rank on CPU; 0 = cores / local ranks

    def validate(self) -> None:
        _check(self.num_threads >= 0, "device.num_threads", self.num_threads, ">= 0")


@dataclass(kw_only=True)
class PrecisionConfig:
    """Parameter/compute dtype; FP8 (Transformer Engine, Hopper) is for device=cuda only.
    The EMA teacher is always fp32."""

    params_dtype: Literal["fp32", "bf16"] = "fp32"
    fp8: Literal["hybrid", "e4m3"] | None = None


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rlp: RLPConfig = field(default_factory=RLPConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

    def validate(self, world_size: int | None = None) -> RunConfig:
        """Check every section, then the cross-section rules; return self."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        p, m = self.parallel, self.model
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        _check(m.num_query_groups % tp == 0, "parallel.tensor_model_parallel_size", tp,
               f"a divisor of model.num_query_groups={m.num_query_groups}")
        _check(m.ffn_hidden_size % tp == 0, "parallel.tensor_model_parallel_size", tp,
               f"a divisor of model.ffn_hidden_size={m.ffn_hidden_size}")
        if "M" in m.hybrid_layer_pattern:
            heads, groups = m.mamba_heads(), m.mamba_num_groups
            _check(heads % tp == 0 and groups % tp == 0, "parallel.tensor_model_parallel_size",
                   tp, f"a divisor of the {heads} Mamba heads and mamba_num_groups={groups}")
        _check(m.make_vocab_size_divisible_by % tp == 0, "parallel.tensor_model_parallel_size",
               tp, f"a divisor of model.make_vocab_size_divisible_by="
               f"{m.make_vocab_size_divisible_by} (the padded vocabulary is split over TP)")
        if world_size is not None:
            _check(world_size % (tp * pp) == 0, "parallel.tensor_model_parallel_size", tp,
                   f"TP*PP dividing the world size {world_size}")
            dp = world_size // (tp * pp)
            _check(self.rlp.contexts_per_step % dp == 0, "rlp.contexts_per_step",
                   self.rlp.contexts_per_step, f"a multiple of the data-parallel size {dp}")
            # A document's positions share one window (prefill, teacher, packed update): they
            # must stay on one rank, or prefixes and packing would depend on the layout.
            ppd = self.rlp.positions_per_document
            _check(self.rlp.contexts_per_step % dp != 0
                   or (self.rlp.contexts_per_step // dp) % ppd == 0,
                   "rlp.positions_per_document", ppd,
                   f"a divisor of the {self.rlp.contexts_per_step // dp} contexts per "
                   f"data-parallel rank (contexts_per_step / DP size {dp}), so that no document "
                   f"is split over ranks")
            _check(self.data.ntp_batch_size % dp == 0, "data.ntp_batch_size",
                   self.data.ntp_batch_size, f"a multiple of the data-parallel size {dp}")
            _check(self.train.eval_interval == 0 or self.train.eval_contexts % dp == 0,
                   "train.eval_contexts", self.train.eval_contexts,
                   f"a multiple of the data-parallel size {dp}")
        _check(self.train.eval_interval == 0 or self.data.split_weights()[1] > 0,
               "train.eval_interval", self.train.eval_interval,
               f"0 unless data.split holds out a valid split (data.split={self.data.split!r}, "
               f"e.g. 98,2,0)")
        stages = m.hybrid_layer_pattern.count("|") + 1
        vp = p.virtual_pipeline_model_parallel_size
        if vp is None:
            _check(stages == 1 or stages == pp, "model.hybrid_layer_pattern",
                   m.hybrid_layer_pattern,
                   f"{pp} pipeline stage(s) (| separated) for pipeline_model_parallel_size={pp}")
        else:
            _check(stages == pp * vp, "model.hybrid_layer_pattern", m.hybrid_layer_pattern,
                   f"{pp * vp} | separated chunks (pipeline_model_parallel_size={pp} x "
                   f"virtual_pipeline_model_parallel_size={vp}), each with at least one layer")
            _check(all(seg for seg in m.hybrid_layer_pattern.split("|")),
                   "model.hybrid_layer_pattern", m.hybrid_layer_pattern,
                   "no empty chunk between | separators")
            if world_size is not None:
                self._check_interleaved_microbatches(world_size // (tp * pp), pp)
        need = self.rlp.max_prefix_tokens + self.rlp.max_thought_tokens + 2
        if self.train.objective == "ntp":
            need = self.data.ntp_seq_length
        _check(m.max_sequence_length >= need, "model.max_sequence_length",
               m.max_sequence_length, f">= {need} (prefix + <think> + thought + </think>)")
        if self.device.type == "cpu":
            _check(self.precision.params_dtype == "fp32", "precision.params_dtype",
                   self.precision.params_dtype, "fp32 on device=cpu")
        # FP8 acts only inside Transformer Engine layers; the layer spec here is Megatron's local
        # one, so an FP8 setting would silently change nothing. Refuse it until a TE spec exists.
        _check(self.precision.fp8 is None, "precision.fp8", self.precision.fp8,
               "null (FP8 needs the Transformer Engine layer spec, which is not built yet)")
        return self

    def _check_interleaved_microbatches(self, dp: int, pp: int) -> None:
        """Megatron's interleaved schedule runs micro-batches in groups of PP: their number
        must be a multiple of PP."""
        if self.train.objective == "rlp":
            sequences = self.rlp.contexts_per_step // dp * self.rlp.group_size
        else:
            sequences = self.data.ntp_batch_size // dp
        mbs = self.train.micro_batch_size
        count = sequences // mbs if mbs and sequences % mbs == 0 else 1
        _check(count % pp == 0, "train.micro_batch_size", mbs,
               f"a size giving a multiple of pipeline_model_parallel_size={pp} micro-batches "
               f"(interleaved pipeline; {sequences} sequences per data-parallel rank)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Loading: YAML + overrides -> typed dataclasses (unknown keys and wrong types are errors)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        # A YAML list, or one string split on whitespace (`data.blend="0.7 a 0.3 b"`).
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: a non-empty list or "
                              f"a space-separated string)")
        out = []
        for item in items:
            if isinstance(item, (dict, list, tuple)) or item is None:
                raise ConfigError(f"invalid config: {key}={value!r} (allowed: a list of scalars)")
            out += str(item).split()
        return out
    if origin is Literal:
        allowed = ", ".join(repr(a) for a in args)
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise ConfigError(f"invalid config: {key}={value!r} (allowed: one of {allowed})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"invalid config: {key}={value!r} (allowed: true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: an integer)")
        try:
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value, 0)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, int):
                return value
        except ValueError:
            pass
        raise ConfigError(f"invalid config: {key}={value!r} (allowed: an integer)")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: a number)")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: a number)") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"invalid config: {key}={value!r} (allowed: a string)")
        return str(value)
    raise ConfigError(f"invalid config: {key} has unsupported type {tp}")


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(cfg: RunConfig, key: str, value: Any) -> None:
    """Set `section.key` on cfg from a raw value (YAML scalar or CLI string)."""
    parts = key.split(".")
    top = _section_types(RunConfig)
    if parts[0] not in top:
        raise ConfigError(f"invalid config: unknown section {parts[0]!r} in {key!r} "
                          f"(allowed: {', '.join(top)})")
    section = getattr(cfg, parts[0])
    hints = _section_types(type(section))
    if len(parts) == 1 and parts[0] == "device" and isinstance(value, str):
        parts = ["device", "type"]  # `device: cpu` is shorthand for `device.type: cpu`
    if len(parts) != 2:
        raise ConfigError(f"invalid config: {key!r} (allowed: section.key, e.g. rlp.group_size)")
    if parts[1] not in hints:
        raise ConfigError(f"invalid config: unknown key {key!r} (allowed in {parts[0]}: "
                          f"{', '.join(hints)})")
    setattr(section, parts[1], _coerce(value, hints[parts[1]], key))


def _flatten(data: dict) -> list[tuple[str, Any]]:
    items = []
    for sec, body in data.items():
        if isinstance(body, dict):
            items += [(f"{sec}.{k}", v) for k, v in body.items()]
        else:
            items.append((str(sec), body))
    return items


def load_config(path: str | None = None, overrides: tuple[str, ...] = (),
                world_size: int | None = None) -> RunConfig:
    """Build a validated RunConfig from defaults, an optional YAML file and overrides.

    Args:
        path: YAML file with sections as top-level keys (any subset).
        overrides: `section.key=value` strings, applied after the file.
        world_size: when known, also check divisibility by the data-parallel size.
    """
    cfg = RunConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"invalid config: file {path!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid config: {path} is not valid YAML ({e.__class__.__name__}: "
                              f"{str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"invalid config: {path} must map section names to settings")
        for key, value in _flatten(data):
            _apply(cfg, key, value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"invalid override {item!r} (allowed: section.key=value)")
        key, value = item.split("=", 1)
        # Raw strings, not YAML: a pattern such as `*-*-` would read as a YAML alias.
        _apply(cfg, key.strip(), value.strip())
    return cfg.validate(world_size)


def load_launch_config(path: str | None, overrides: tuple[str, ...]) -> RunConfig:
    """`load_config` for an entry point under torchrun (world size from WORLD_SIZE): a bad
    value prints its one-line error and exits 2, before torch.distributed starts."""
    try:
        return load_config(path, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
