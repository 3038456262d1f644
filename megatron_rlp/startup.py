"""Start-up of every entry point: the config with the checks that need more than the config,
and the launcher glue.

`config/` holds the pure rules (a value against its section and the other sections). What a
run also needs before `torch.distributed` starts is here, at the top of the package because
it reaches into its lower layers:

- the machine checks: `model.transformer_impl` and `precision.fp8` against this machine
  (Transformer Engine importable, CUDA, the GPU's compute capability:
  `backends/transformer_engine.py`) and `model.packed_attention=flex` (`packing/flex.py`);
- the memory check (`check_memory`): a `device.type=cuda` launch whose estimated peak per
  GPU (`train/memory.py`) exceeds the GPU's memory (or `device.memory_gib`) is refused,
  naming the settings that would fit (`train/memory_fit.py`);
- `train.use_checkpoint_args`: the model section from a Megatron-LM checkpoint's saved args
  (`interop/megatron_lm.py`);
- the launcher glue: world size and ranks under torchrun or srun (`config.launch_env`), one
  `error:` line from global rank 0, exit 2 on every rank, and Megatron's import-time warnings
  silenced.

Entry points (`pretrain_rlp.py`, `tools/*.py`, `examples/megatron_lm/pretrain_gpt_rlp.py`
through `plugin.py`) load their config through `load_config` / `load_launch_config` here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import warnings

from megatron_rlp.config import ConfigError, RLPConfig, RunConfig, launch_env, read_config
from megatron_rlp.config.errors import check
from megatron_rlp.config.loading import ConfigPaths, quiet_imports

__all__ = ["check_machine", "check_memory", "check_run_start", "launch_env", "let_rank0_print",
           "load_config", "load_launch_config", "print_error", "quiet_megatron", "unused_keys",
           "validate"]


def check_machine(cfg: RunConfig) -> None:
    """The config rules that need this machine: `model.transformer_impl` and `precision.fp8`
    (TE importable, CUDA, compute capability), `model.packed_attention=flex`.

    Raises:
        ConfigError: one line naming the key, the value and what this machine allows.
    """
    _check_transformer_engine(cfg)
    _check_packed_attention(cfg)


def _check_packed_attention(cfg: RunConfig) -> None:
    """`model.packed_attention=flex` where FlexAttention cannot run the packed update."""
    if cfg.model.packed_attention != "flex":
        return
    from megatron_rlp.packing import flex

    try:
        flex.resolve("flex", cfg.device.type, cfg.model.hybrid_layer_pattern)
    except ValueError as e:
        raise ConfigError(f"invalid config: model.packed_attention='flex' (allowed: auto or "
                          f"mask here; flex needs {e})") from None


def _check_transformer_engine(cfg: RunConfig) -> None:
    """`model.transformer_impl` and `precision.fp8` against this machine: TE importable,
    CUDA, the GPU's compute capability (backends/transformer_engine.py)."""
    from megatron_rlp.backends import transformer_engine as te

    m, pr, device = cfg.model, cfg.precision, cfg.device.type
    if m.transformer_impl == "local" and pr.fp8 is None:
        return  # nothing to probe
    # TE is CUDA-only: on CPU it is never imported (auto resolves to local).
    have_te = device == "cuda" and te.transformer_engine_available()
    try:
        impl = te.resolve_transformer_impl(m.transformer_impl, device, have_te)
    except ValueError as e:
        raise ConfigError(f"invalid config: model.transformer_impl={m.transformer_impl!r} "
                          f"(allowed: local or auto here; transformer_engine needs {e})"
                          ) from None
    if pr.fp8 is None:
        return
    missing = te.fp8_requirement(pr.fp8_recipe, device, have_te,
                                 te.cuda_capability() if have_te else None,
                                 te.cuda_version() if have_te else None)
    check(missing is None, "precision.fp8", pr.fp8,
          f"null here; FP8 (fp8_recipe={pr.fp8_recipe}) needs {missing}")
    check(impl == "transformer_engine", "precision.fp8", pr.fp8,
          "null with model.transformer_impl=local (FP8 runs only in Transformer Engine "
          "layers; use transformer_impl=auto or transformer_engine)")
    check(pr.params_dtype == "bf16", "precision.params_dtype", pr.params_dtype,
          f"bf16 with precision.fp8={pr.fp8} (FP8 GEMMs on bf16 weights)")
    check(not (pr.first_last_layers_bf16 and pr.fp8_recipe == "delayed"),
          "precision.first_last_layers_bf16", pr.first_last_layers_bf16,
          "false with fp8_recipe=delayed (Megatron: delayed scaling cannot leave layers in "
          "bf16; use tensorwise, blockwise or mxfp8)")
    if pr.first_last_layers_bf16:
        layers = sum(c in "M*-E" for c in m.hybrid_layer_pattern)
        stage = layers // cfg.parallel.pipeline_model_parallel_size
        for key in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            v = getattr(pr, key)
            check(v <= stage, f"precision.{key}", v,
                  f"<= {stage} layers per pipeline stage (Megatron's limit)")


def _use_checkpoint_args(cfg: RunConfig) -> None:
    """The model section from a Megatron-LM checkpoint's args (interop/megatron_lm.py), or
    from this project's own checkpoint (the config saved with it; `hf-to-megatron` output
    too). The configured pattern's `|` stage splits are kept when the layers are the same."""
    from megatron_rlp.interop import megatron_lm

    try:
        if cfg.train.load and megatron_lm.find(cfg.train.load) is None:
            _use_own_checkpoint_model(cfg)
            return
        megatron_lm.apply_checkpoint_args(cfg)
    except (megatron_lm.MegatronLMError, OSError) as e:
        text = str(e)
        if not text.startswith("train.use_checkpoint_args"):
            text = f"train.use_checkpoint_args=true: {text}"
        raise ConfigError(f"invalid config: {text}") from None


def _use_own_checkpoint_model(cfg: RunConfig) -> None:
    """`train.use_checkpoint_args` on this project's checkpoint: its saved `model` section."""
    from megatron.core import dist_checkpointing

    from megatron_rlp.checkpoint import CheckpointError, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(cfg.train.load)
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except CheckpointError as e:
        raise ConfigError(f"invalid config: train.use_checkpoint_args=true: {e}") from None
    saved = dict(((common or {}).get("config") or {}).get("model") or {})
    check(bool(saved), "train.use_checkpoint_args", True,
          f"false here: {ckpt} holds no model section")
    mine = cfg.model.hybrid_layer_pattern
    if mine.replace("|", "") == str(saved.get("hybrid_layer_pattern", "")).replace("|", ""):
        saved["hybrid_layer_pattern"] = mine
    known = {f.name for f in dataclasses.fields(cfg.model)}
    for key, value in saved.items():
        if key in known and key not in ("transformer_impl", "packed_attention"):
            setattr(cfg.model, key, value)  # the layers' kernels stay this run's choice


def validate(cfg: RunConfig, world_size: int | None = None) -> RunConfig:
    """`cfg.validate(world_size)` (the pure rules), then `check_machine`; return cfg.

    Raises:
        ConfigError: the first bad value (one line).
    """
    # Validation imports some of the package's modules (templates' tokenizers, TE probing),
    # which import Megatron-Core; its import-time notices (TE/Apex missing, no CUDA runtime)
    # would come before a one-line config error.
    with quiet_imports():
        cfg.validate(world_size)
        check_machine(cfg)
    return cfg


def load_config(path: ConfigPaths = None, overrides: tuple[str, ...] = (),
                world_size: int | None = None) -> RunConfig:
    """Build a validated RunConfig from defaults, an optional YAML file and overrides
    (`config.read_config`), the model section of a Megatron-LM checkpoint with
    `train.use_checkpoint_args`, and check it: the pure rules, then this machine.

    Args:
        path: YAML file(s) with sections as top-level keys (any subset); several are merged in
            order, later ones winning (`config.read_config`).
        overrides: `section.key=value` strings, applied after the files.
        world_size: when known, also check divisibility by the data-parallel size.

    Raises:
        ConfigError: the first bad value (one line naming the key, the value, what is allowed).
    """
    cfg = read_config(path, overrides)
    if cfg.train.use_checkpoint_args:
        _use_checkpoint_args(cfg)
    return validate(cfg, world_size)


def check_memory(cfg: RunConfig, world_size: int, local_rank: int = 0) -> str:
    """Refuse a `device.type=cuda` launch whose estimated peak per GPU (train/memory.py)
    exceeds the GPU's memory: `device.memory_gib`, else this process's GPU
    (`torch.cuda.get_device_properties`). Skipped with `device.skip_memory_check`, on CPU, and
    where neither is known (no GPU visible, no `device.memory_gib`).

    Returns:
        What was checked, one phrase (`--check-world-size` prints it).

    Raises:
        ConfigError: one line naming the estimated peak, the device memory and the settings
            that would fit (`train/memory_fit.py`).
    """
    d = cfg.device
    if d.type != "cuda" or d.skip_memory_check:
        return "memory not checked" + (" (device.skip_memory_check)" if d.type == "cuda" else "")
    gib, source = d.memory_gib, "device.memory_gib"
    if gib is None:
        import torch

        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            return "memory not checked (no GPU here: set device.memory_gib)"
        props = torch.cuda.get_device_properties(local_rank)
        gib, source = props.total_memory / 1024**3, props.name
    from megatron_rlp.backends import transformer_engine as te
    from megatron_rlp.train.memory import attention_kind
    from megatron_rlp.train.memory_fit import check_fits

    est = check_fits(cfg, world_size, _vocab_size(cfg), gib, source,
                     attention_kind(cfg, te.transformer_engine_available()))
    return f"estimated peak {est['total'] / 1024**3:.1f} of {gib:.1f} GiB per GPU"


def _vocab_size(cfg: RunConfig) -> int:
    """The tokenizer's vocabulary as training builds it; the model's padding multiple (the
    padded vocabulary's lower bound) when the tokenizer cannot be read here."""
    from megatron_rlp.tokenizer import build_tokenizer

    try:
        return build_tokenizer(cfg.data.tokenizer).vocab_size
    except (OSError, ValueError, ImportError):
        return cfg.model.make_vocab_size_divisible_by


def let_rank0_print(seconds: float = 3.0) -> None:
    """On a rank other than 0 that is about to exit over an error rank 0 prints: wait a moment
    first. torchrun stops the whole job as soon as one worker exits non-zero, and a rank that
    exited at once could get rank 0 killed before its `error:` line is out."""
    time.sleep(seconds)


def print_error(error: BaseException | str) -> None:
    """`error: ...` on stderr from global rank 0 only (every rank of a job meets the same
    error); the other ranks wait for it to be out (`let_rank0_print`)."""
    if launch_env()[1] == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    else:
        let_rank0_print()


def check_run_start(cfg: RunConfig) -> None:
    """What a training entry point (pretrain_rlp.py, also with --check-world-size) refuses on
    top of `load_config`: a recipe with a `train.base_model` run as RLP from random weights
    (no `train.load`) or with the byte tokenizer, unless `train.allow_random_init`. Tools that
    read the recipes for their shapes (memory estimates, GPU checks) do not call it.

    Raises:
        ConfigError: one line naming `train.load` or `data.tokenizer`, and what the recipe
            expects.
    """
    t = cfg.train
    if t.objective != "rlp" or t.base_model is None or t.allow_random_init:
        return
    expects = (f"this recipe continues {t.base_model}: convert it with `python "
               f"tools/convert_checkpoint.py hf-to-megatron --hf-dir DIR --out OUT --tokenizer "
               f"DIR/tokenizer.json`, then train.load=OUT data.tokenizer=DIR/tokenizer.json "
               f"data.corpus=<your text, .jsonl or an indexed prefix>; or "
               f"train.allow_random_init=true to run RLP from random weights anyway")
    check(t.load is not None, "train.load", t.load, expects)
    check(cfg.data.tokenizer != "byte", "data.tokenizer", cfg.data.tokenizer, expects)


def unused_keys(cfg: RunConfig) -> list[str]:
    """`rlp.*` settings (differing from the defaults) that a `train.objective=ntp` run never
    reads: all of them without `train.eval_interval`, else those the held-out evaluation
    (train/validate.py) does not use. Empty for RLP runs."""
    if cfg.train.objective != "ntp":
        return []
    read = set() if not cfg.train.eval_interval else {
        "min_prefix_tokens", "max_prefix_tokens", "position_stride", "skip_thought_spans",
        "group_size", "max_thought_tokens", "temperature", "top_p", "thought_template"}
    default = RLPConfig()
    return [f"rlp.{f.name}={getattr(cfg.rlp, f.name)}" for f in dataclasses.fields(RLPConfig)
            if f.name not in read and getattr(cfg.rlp, f.name) != getattr(default, f.name)]


def load_launch_config(path: ConfigPaths, overrides: tuple[str, ...]) -> RunConfig:
    """`load_config` for an entry point under torchrun or srun (world size from `launch_env`),
    before torch.distributed starts. A bad value prints one `error:` line, from global rank 0
    only (every rank of a job reads the same config), and every rank exits 2."""
    world, rank, local_rank = launch_env()
    try:
        cfg = load_config(path, overrides, world_size=world)
        check_run_start(cfg)
        if cfg.device.type == "cuda":
            import torch

            visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
            check(local_rank < visible, "device.type", cfg.device.type,
                  f"cpu: this process (local rank {local_rank}) sees {visible} CUDA device(s)")
            check_memory(cfg, world, local_rank)
        if world > 1 and "WORLD_SIZE" not in os.environ:  # srun: env:// rendezvous
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise ConfigError(f"invalid launch: srun started {world} tasks but "
                                  f"{' and '.join(missing)} is not set (allowed: export "
                                  "MASTER_ADDR=<first node> MASTER_PORT=<free port>, or "
                                  "launch with torchrun)")
        unused = unused_keys(cfg)
        if unused and rank == 0:
            print(f"[config] train.objective=ntp does not read {', '.join(unused)} (RLP "
                  "settings)", flush=True)
        return cfg
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            let_rank0_print()
        raise SystemExit(2) from None


def quiet_megatron(checkpoint: bool = True) -> None:
    """Silence, for the rest of the process, what a run never uses but Megatron and torch
    announce at import: warnings from Megatron's modules (optional kernels, TE, Apex), from
    torch.distributed.checkpoint (with `checkpoint`), and torch's extension loader notice
    about a missing CUDA runtime on CPU machines."""
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    if checkpoint:
        warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint\..*")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
