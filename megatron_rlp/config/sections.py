"""The run's other sections: `optimizer`, `data`, `train` and `device`, each checking its own
values; with `parse_blend`, the reading of `data.blend` that `data/indexed.py` uses too."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_rlp.config.errors import ConfigError, check


class BlendError(ValueError):
    """A `data.blend` that cannot be parsed (the message says what is allowed)."""


def parse_blend(spec: str | Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Parse `"0.7 A 0.3 B"` (weighted) or `"A B"` (by size) into (prefixes, weights).

    Args:
        spec: One string, or a list of strings (YAML), split on whitespace.

    Raises:
        BlendError: Empty, odd weight/prefix pairs, or a weight that is not a positive number.
    """
    items = spec.split() if isinstance(spec, str) else [w for s in spec for w in str(s).split()]
    if not items:
        raise BlendError("one or more indexed-dataset prefixes, optionally each after a weight")

    def number(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None

    if number(items[0]) is None:
        if any(number(s) is not None for s in items):
            raise BlendError("either a weight before every prefix or no weights at all")
        return items, None
    if len(items) % 2:
        raise BlendError("pairs of WEIGHT PREFIX, e.g. '0.7 data/a_text 0.3 data/b_text'")
    weights = [number(w) for w in items[0::2]]
    prefixes = items[1::2]
    if any(w is None or not (w > 0 and math.isfinite(w)) for w in weights):
        raise BlendError("positive weights, each followed by a prefix")
    if any(number(p) is not None for p in prefixes):
        raise BlendError("pairs of WEIGHT PREFIX (a prefix looks like a number)")
    return prefixes, [float(w) for w in weights]


@dataclass(kw_only=True)
class OptimizerConfig:
    """Adam(W) through Megatron's `get_megatron_optimizer`, with its lr scheduler."""

    lr: float = 1e-4
    """Peak learning rate (Megatron-LM `--lr`); a finite number > 0."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay (`--min-lr`); in [0, lr]."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps from 0 to `lr` (`--lr-warmup-iters`); >= 0."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay from `lr` to `min_lr` over `train.steps` (`--lr-decay-style`)."""
    weight_decay: float = 0.1
    """AdamW weight decay (`--weight-decay`); >= 0."""
    adam_beta1: float = 0.9
    """Adam beta1 (`--adam-beta1`); in [0, 1)."""
    adam_beta2: float = 0.95
    """Adam beta2 (`--adam-beta2`); in [0, 1)."""
    adam_eps: float = 1e-8
    """Adam epsilon (`--adam-eps`); > 0."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (`--clip-grad`); 0 = off."""

    def validate(self) -> None:
        check(0 < self.lr < math.inf, "optimizer.lr", self.lr, "a finite number > 0")
        check(0 <= self.min_lr <= self.lr, "optimizer.min_lr", self.min_lr, "in [0, lr]")
        check(self.lr_warmup_steps >= 0, "optimizer.lr_warmup_steps", self.lr_warmup_steps,
              ">= 0")
        check(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, ">= 0")
        for key in ("adam_beta1", "adam_beta2"):
            v = getattr(self, key)
            check(0 <= v < 1, f"optimizer.{key}", v, "in [0, 1)")
        check(self.adam_eps > 0, "optimizer.adam_eps", self.adam_eps, "> 0")
        check(self.clip_grad >= 0, "optimizer.clip_grad", self.clip_grad, ">= 0 (0 = off)")


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
    """A JSONL/.txt file (tokenized at start-up) or the prefix of a Megatron indexed dataset
    (`PREFIX.bin` + `PREFIX.idx`, made by tools/preprocess_data.py)."""
    blend: list[str] | None = None
    """Several indexed datasets instead of `corpus` (Megatron-LM `--data-path`):
    `"0.7 PREFIX_A 0.3 PREFIX_B"` (weights, or no weights to blend by size), as one string or a
    YAML list; null = use `corpus`."""
    split: str = "100,0,0"
    """Train,valid,test weights over each dataset's documents, Megatron-style (`--split`), e.g.
    `98,2,0`; train > 0. `train.eval_interval` needs a valid share."""
    cache_dir: str | None = None
    """Megatron's dataset index cache (`--data-cache-path`); null = beside each prefix."""
    tokenizer: str = "byte"
    """`byte` (the built-in byte tokenizer) or a path to a Hugging Face tokenizer.json (or its
    directory)."""
    ntp_seq_length: int = 128
    """Window length in tokens for `train.objective=ntp` (`--seq-length`); >= 2."""
    ntp_batch_size: int = 16
    """Global sequences per NTP step (`--global-batch-size`); >= 1."""

    def split_weights(self) -> list[float]:
        """`split` as three non-negative numbers (train, valid, test)."""
        parts = [p for p in self.split.replace(" ", "").split(",") if p]
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            weights = []
        ok = 1 <= len(weights) <= 3 and all(w >= 0 and math.isfinite(w) for w in weights)
        check(ok and weights[0] > 0, "data.split", self.split,
              "up to three comma-separated weights train,valid,test with train > 0, e.g. 98,2,0")
        return weights + [0.0] * (3 - len(weights))

    def validate(self) -> None:
        check(bool(self.corpus), "data.corpus", self.corpus,
              "a path to a .jsonl or .txt file, or an indexed-dataset prefix")
        if self.blend is not None:
            try:
                prefixes, _ = parse_blend(self.blend)
            except BlendError as e:
                raise ConfigError(f"invalid config: data.blend={self.blend!r} (allowed: {e})"
                                  ) from None
            for prefix in prefixes:
                check(Path(prefix + ".idx").is_file() and Path(prefix + ".bin").is_file(),
                      "data.blend", prefix, "indexed-dataset prefixes with .bin and .idx files "
                      "(tools/preprocess_data.py writes them)")
        self.split_weights()
        check(self.tokenizer == "byte" or Path(self.tokenizer).exists(), "data.tokenizer",
              self.tokenizer, "'byte' or an existing tokenizer.json path")
        check(self.ntp_seq_length >= 2, "data.ntp_seq_length", self.ntp_seq_length, ">= 2")
        check(self.ntp_batch_size >= 1, "data.ntp_batch_size", self.ntp_batch_size, ">= 1")


@dataclass(kw_only=True)
class TrainConfig:
    """The loop: objective, steps, logging, checkpoints, and what ends a run early.

    Fault handling (docs/reliability.md): a step whose loss or gradient is not finite is
    skipped (no parameter, optimizer or teacher change) and counted; `max_consecutive_skips`
    in a row stop the run with an error. SIGTERM/SIGUSR1, `wall_time_limit_minutes` and
    `exit_interval` stop it cleanly: every rank saves at the next step boundary, exit code 0.
    """

    objective: Literal["rlp", "ntp"] = "rlp"
    """`rlp` (reinforcement learning pretraining) or `ntp` (plain next-token pretraining on the
    same loop: warm-up and compute-matched baselines)."""
    steps: int = 20
    """Optimizer steps to run (`--train-iters`); >= 0."""
    seed: int = 1234
    """Random seed of data order, sampling and initialization (`--seed`)."""
    log_interval: int = 1
    """Print (and log) metrics every this many steps (`--log-interval`); >= 1."""
    metrics_file: str | None = None
    """JSON lines of every step's metrics, written by rank 0; null = none."""
    save: str | None = None
    """Checkpoint directory (`--save`); null = no checkpoints."""
    save_interval: int = 0
    """Save every this many steps (`--save-interval`); 0 = only at the end (when `save` is
    set)."""
    keep_last: int = 0
    """Keep this many newest checkpoints under `save`; 0 = keep all."""
    checkpoint_checksums: bool = True
    """Write a SHA-256 manifest on save and verify it on load."""
    dist_optimizer_checkpoint: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """Distributed-optimizer state on disk: `dp_reshardable` (each rank writes its shards;
    loads with any DP size, same TP/PP) or `fully_reshardable` (gathered per parameter over DP
    on save; loads into any TP/PP/DP layout; Megatron-LM
    `--dist-ckpt-optim-fully-reshardable`)."""
    load: str | None = None
    """Checkpoint to resume from (same objective) or warm-start from (other objective)
    (`--load`); null = start from scratch. A Hugging Face model directory is refused with the
    conversion command. Equal to `save` (Megatron-LM's `--save X --load X`): resume from X when
    it holds a checkpoint, else start from scratch (one line says so)."""
    base_model: str | None = None
    """The pretrained model a recipe continues from (examples/configs/qwen3_1p7b.yaml: the HF
    Qwen3-1.7B-Base). Its RLP run refuses to start (`pretrain_rlp.py`, with
    `--check-world-size` too) without `load` or with the byte tokenizer, naming what it
    expects: RLP from random weights is never meant. null = no such check."""
    allow_random_init: bool = False
    """Run a recipe with a `base_model` as RLP from random weights (or the byte tokenizer)
    anyway."""
    use_checkpoint_args: bool = False
    """Take the model section from the checkpoint in `load` (`--use-checkpoint-args`): a
    Megatron-LM checkpoint's saved args, or the config saved with this project's checkpoints
    (`hf-to-megatron` output too); otherwise they are checked against the model."""
    micro_batch_size: int = 0
    """Sequences per update micro-batch (`--micro-batch-size`); 0 = all at once."""
    recompute_granularity: Literal["none", "selective", "full"] = "none"
    """Activation recomputation in the update (`--recompute-granularity`): `selective`
    recomputes the core attention (the seq^2 scores) in backward, `full` whole layers in
    groups of `recompute_num_layers` (only their inputs are kept). Same gradients, less
    memory."""
    recompute_num_layers: int = 1
    """Layers per recomputed group with `recompute_granularity=full`
    (`--recompute-num-layers`); >= 1."""
    compile_update: bool = False
    """Run the update's (RLP and NTP) attention and MLP layers under torch.compile (inductor;
    regional, one layer at a time as torchtitan's `apply_compile`;
    train/compiled_update.py): the norms, QKV with QK norms and RoPE, SwiGLU, the residual
    adds and their backwards fused. Core attention, Mamba and MoE layers, the embedding, the
    output layer and the loss stay eager; rollouts and scoring are unchanged. Dynamic
    shapes; graph compilations counted in the `update_compiles` metric; loss and gradients
    equal the eager update within fp32 rounding. Eager (one warning) with tensor or pipeline
    parallelism or Transformer Engine layers. Off by default: measured on cpu
    (docs/performance.md) the update is 1.12-1.25x faster at 0.8M and 25M, but each process
    first compiles for 20-80 s; not yet run on cuda."""
    max_consecutive_skips: int = 5
    """Non-finite steps in a row (each skipped: no parameter, optimizer or teacher change)
    before the run stops with an error; >= 1."""
    wall_time_limit_minutes: float = 0.0
    """Save and exit 0 after this many minutes (`--exit-duration-in-mins`); 0 = no limit."""
    exit_interval: int = 0
    """Save and exit 0 after a step divisible by this (`--exit-interval`); 0 = off."""
    eval_interval: int = 0
    """Held-out evaluation on the valid split (train/validate.py): next-token NLL without and
    with a thought, every this many steps (`--eval-interval`); 0 = never. Needs a valid share
    in `data.split`."""
    eval_contexts: int = 32
    """Held-out contexts per evaluation; >= 1."""
    eval_position_strategy: Literal["uniform", "stride", "entropy", "answer"] = "uniform"
    """Where the held-out contexts are (one position per document): `uniform`, `stride`
    (rlp.position_stride), `entropy` (the teacher's highest-entropy positions;
    data/contexts.py) or `answer` (the answers' first tokens of a task corpus with
    answer_offsets, data/answer_positions.py)."""
    tensorboard_dir: str | None = None
    """TensorBoard scalars directory (`--tensorboard-dir`; needs the tensorboard package, a
    missing one is a notice); null = off."""
    wandb_project: str | None = None
    """Weights & Biases project (`--wandb-project`; needs wandb, WANDB_MODE=offline works);
    null = off."""
    progress: bool = True
    """Rank 0: an ETA column on console lines, a live bar on a terminal."""
    finetune: bool = False
    """Load the policy weights only from `load` and start at step 0 (`--finetune`); needs
    `load`."""
    load_optimizer: bool = True
    """Load the Adam state from the checkpoint; false = `--no-load-optim`."""
    load_rng: bool = True
    """Load the RNG states from the checkpoint; false = `--no-load-rng`."""
    override_scheduler: bool = True
    """true: the configured lr/wd schedule applies from the loaded step
    (`--override-opt_param-scheduler`); false: keep the checkpoint's
    (`--use-checkpoint-opt_param-scheduler`)."""
    distributed_timeout_minutes: float = 10.0
    """Process-group timeout of every collective (`--distributed-timeout-minutes`); a finite
    number > 0, fractions allowed."""
    watchdog_minutes: float = 60.0
    """The longest one step, save or load may take before the rank prints every thread's
    stack and exits 3 (train/watchdog.py); 0 = off. A whole step can take longer than one
    collective: the default hour leaves room for long RLP steps at scale; set it to a few
    times your step time."""

    def watchdog_seconds(self) -> float:
        """The per-step/per-save limit in seconds (0 = off)."""
        return 60.0 * self.watchdog_minutes

    def validate(self) -> None:
        check(self.steps >= 0, "train.steps", self.steps, "an integer >= 0")
        check(self.log_interval >= 1, "train.log_interval", self.log_interval, ">= 1")
        check(self.save_interval >= 0, "train.save_interval", self.save_interval, ">= 0")
        check(self.keep_last >= 0, "train.keep_last", self.keep_last, ">= 0 (0 = keep all)")
        check(self.micro_batch_size >= 0, "train.micro_batch_size", self.micro_batch_size,
              ">= 0")
        check(self.recompute_num_layers >= 1, "train.recompute_num_layers",
              self.recompute_num_layers, "an integer >= 1")
        check(self.max_consecutive_skips >= 1, "train.max_consecutive_skips",
              self.max_consecutive_skips, "an integer >= 1")
        check(0 <= self.wall_time_limit_minutes < math.inf, "train.wall_time_limit_minutes",
              self.wall_time_limit_minutes, "a finite number >= 0 (0 = no limit)")
        check(self.exit_interval >= 0, "train.exit_interval", self.exit_interval,
              ">= 0 (0 = off)")
        check(self.eval_interval >= 0, "train.eval_interval", self.eval_interval, ">= 0 (0 = off)")
        check(self.eval_contexts >= 1, "train.eval_contexts", self.eval_contexts, ">= 1")
        if self.save is not None:
            check(bool(self.save) and not Path(self.save).is_file(), "train.save", self.save,
                  "a directory path (not an existing file)")
        # Megatron-LM's `--save X --load X`: with nothing in X the run starts from scratch
        # (train/loop.py says so in one line); a load path of its own must exist.
        same = self.load is not None and self.save is not None and \
            Path(self.load).resolve() == Path(self.save).resolve()
        if self.load is not None and not same:
            check(Path(self.load).is_dir(), "train.load", self.load,
                  "an existing checkpoint directory (or train.load = train.save: resume from "
                  "it when it holds a checkpoint, else start from scratch)")
            check(not _hf_model_dir(Path(self.load)), "train.load", self.load,
                  "a checkpoint directory; this is a Hugging Face model directory: convert it "
                  f"first with `python tools/convert_checkpoint.py hf-to-megatron --hf-dir "
                  f"{self.load} --out {self.load.rstrip('/')}-megatron`, then "
                  f"train.load={self.load.rstrip('/')}-megatron")
        check(0 < self.distributed_timeout_minutes < math.inf,
              "train.distributed_timeout_minutes", self.distributed_timeout_minutes,
              "a finite number of minutes > 0 (Megatron's default: 10)")
        check(0 <= self.watchdog_minutes < math.inf, "train.watchdog_minutes",
              self.watchdog_minutes, "a finite number of minutes >= 0 (0 = off)")
        check(not (self.finetune and self.load is None), "train.finetune", self.finetune,
              "true only with train.load set (the weights to fine-tune)")
        if self.tensorboard_dir is not None:
            check(bool(self.tensorboard_dir) and not Path(self.tensorboard_dir).is_file(),
                  "train.tensorboard_dir", self.tensorboard_dir,
                  "a directory path (not an existing file) or null")
        if self.wandb_project is not None:
            check(bool(self.wandb_project.strip()) and "/" not in self.wandb_project,
                  "train.wandb_project", self.wandb_project, "a W&B project name or null")


def _hf_model_dir(path: Path) -> bool:
    """A Hugging Face model directory (config.json + weights), not a checkpoint?"""
    if (path / "latest").exists() or (path / "metadata.json").exists() or \
            any(path.glob("step_*")):
        return False
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        or (path / "model.safetensors.index.json").is_file())


@dataclass(kw_only=True)
class DeviceConfig:
    """`cpu` runs the real Megatron-Core code on CPU with gloo (see backends/cpu.py)."""

    type: Literal["cpu", "cuda"] = "cpu"
    """`cpu` (gloo, the real Megatron-Core code; backends/cpu.py) or `cuda` (one device per
    rank, NCCL). `device: cpu` in YAML is shorthand for `device: {type: cpu}`."""
    num_threads: int = 0
    """Torch intra-op threads per rank on CPU; 0 = cores / local ranks."""
    memory_gib: float | None = None
    """Memory of one GPU in GiB that start-up checks the estimated peak per rank against
    (train/memory.py; a launch that cannot fit is refused before torch.distributed starts,
    naming the settings that would fit); null = ask the GPU
    (`torch.cuda.get_device_properties`). Set it to check a launch on a machine without the
    GPU (`pretrain_rlp.py --check-world-size N device.memory_gib=80`) or to leave headroom."""
    skip_memory_check: bool = False
    """Launch even when the estimated peak exceeds `memory_gib` (the estimate is a model, not
    a measurement: docs/reliability.md)."""

    def validate(self) -> None:
        check(self.num_threads >= 0, "device.num_threads", self.num_threads, ">= 0")
        check(self.memory_gib is None or 0 < self.memory_gib < math.inf, "device.memory_gib",
              self.memory_gib, "null (ask the GPU) or a number of GiB > 0")

