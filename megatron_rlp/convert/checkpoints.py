"""Hugging Face directories (config.json + *.safetensors) <-> this project's checkpoints.

HF -> Megatron builds the model at TP=1/PP=1 in this process (CPU, gloo), loads the mapped
weights and writes a dist_checkpointing checkpoint `OUT/step_00000000` (+ `OUT/latest`) in the
layout of checkpoint/, marked as objective "hf-import": `train.load=OUT` warm-starts the
policy (the EMA teacher starts as its copy) under any TP/PP — dist_checkpointing reshards.
It also writes `OUT/model.yaml`, the `model:` section that matches the weights.

Megatron -> HF loads a checkpoint (any TP/PP it was saved with) into a TP=1 model and writes
`model.safetensors` + `config.json` (+ the tokenizer files of a template directory).

Vocabulary: HF embeddings are usually padded past the tokenizer (Qwen3: 151,936 rows for
151,669 ids). The converted model keeps every row: `model.make_vocab_size_divisible_by` is set
to the HF vocab_size, so that Megatron pads any tokenizer up to exactly that many rows (the
extra rows are never sampled nor scored). Export writes back the rows of a real vocabulary
only: the source HF config's `vocab_size` for an imported model, else the size of the run's
`data.tokenizer` (<think>/</think> included). Megatron's padding rows past it are cut, as the
product itself never samples nor scores them; an HF model keeping them puts probability on ids
the tokenizer does not have, and `generate` samples them (Megatron-Bridge issue 625).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

import torch
import yaml

from megatron_rlp.convert.errors import ConversionError
from megatron_rlp.convert.mapping import (
    ARCHITECTURES,
    architecture_of_hf,
    architecture_of_megatron,
)
from megatron_rlp.convert.refusals import check_hf_config, check_megatron_model

# Megatron's modules must be imported before the CPU backend patches torch.cuda (their
# torch.compile decorators run at import), so import them here, not after `initialize`.
from megatron_rlp.models.provider import build_model
from megatron_rlp.models.vocab import padded_vocab_size

HF_OBJECTIVE = "hf-import"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")


def read_hf(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and all weights of a local HF model directory (safetensors only)."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / "config.json").is_file():
        raise ConversionError(f"{d}: no config.json (expected a local Hugging Face model dir)")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{d}: no *.safetensors weights (pytorch_model.bin is not read)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return json.loads((d / "config.json").read_text()), sd


def write_hf(directory: str | Path, config: dict, sd: dict[str, torch.Tensor],
             template: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `model.safetensors` + `config.json` (and a template's tokenizer files)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in sd.items()}
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if template is not None:
        for name in TOKENIZER_FILES:
            if (Path(template) / name).is_file() and name != "config.json":
                shutil.copy2(Path(template) / name, d / name)
    return d


def _run_config(model_fields: dict, tokenizer: str = "byte"):
    """A RunConfig for one CPU process holding the whole model."""
    from megatron_rlp.config import ModelConfig, RunConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = RunConfig()
    cfg.model = ModelConfig(**{k: v for k, v in model_fields.items() if k in known})
    cfg.model.validate()
    cfg.data.tokenizer = tokenizer
    cfg.device.type = "cpu"
    return cfg


@contextlib.contextmanager
def _megatron(cfg):
    """Megatron's process groups for one process (reused when the caller set them up)."""
    import torch.distributed as dist

    from megatron_rlp import distributed

    if dist.is_initialized():
        yield
        return
    import os

    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ConversionError("conversion runs in one process (not under torchrun)")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)  # e.g. inherited from a parent run: take a free port
    distributed.initialize(cfg)
    try:
        yield
    finally:
        distributed.shutdown()


def _thread_queue() -> None:
    # dist_checkpointing's synchronous save collects results through a multiprocessing
    # Manager (a spawned server process); a plain queue serves its writer threads.
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _model_signature(cfg, padded_vocab: int) -> dict:
    from megatron_rlp.checkpoint.compat import ARCH_KEYS

    m = cfg.model
    sig = {k: getattr(m, k) for k in ARCH_KEYS if hasattr(m, k)}
    sig["hybrid_layer_pattern"] = m.hybrid_layer_pattern.replace("|", "")
    sig["padded_vocab_size"] = padded_vocab
    return sig


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, tokenizer: str | None = None
                   ) -> Path:
    """Convert a local HF Qwen3 / Nemotron-H directory into a warm-start checkpoint.

    Args:
        hf_dir: config.json + *.safetensors.
        out_dir: Becomes a `train.save`-style root: step_00000000/, latest, model.yaml.
        tokenizer: `data.tokenizer` the model will train with; checked to fit the vocabulary.

    Returns:
        The checkpoint directory.
    """
    from megatron.core import dist_checkpointing

    config_json = Path(hf_dir) / "config.json"
    if config_json.is_file():  # refuse what is not modelled before reading any weights
        early = json.loads(config_json.read_text())
        ARCHITECTURES[architecture_of_hf(early)]["model_config"](early)
    hf_cfg, hf_sd = read_hf(hf_dir)
    arch = architecture_of_hf(hf_cfg)
    spec = ARCHITECTURES[arch]
    fields = spec["model_config"](hf_cfg)
    vocab = int(hf_cfg["vocab_size"])
    fields["make_vocab_size_divisible_by"] = vocab  # keep exactly the HF rows
    if tokenizer is not None:
        from megatron_rlp.tokenizer import build_tokenizer

        tok = build_tokenizer(tokenizer)
        if tok.vocab_size > vocab:
            raise ConversionError(
                f"tokenizer {tokenizer} has {tok.vocab_size} ids (with <think>/</think>), the "
                f"model's embedding only {vocab} rows")
    mapped = spec["to_megatron"](hf_sd, fields)
    cfg = _run_config(fields, tokenizer or "byte")
    out = Path(out_dir)
    ckpt = out / "step_00000000"
    with _megatron(cfg):
        model = build_model(cfg, vocab)
        assert padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by) == vocab
        expected = {k for k in model.state_dict() if not k.endswith("_extra_state")}
        if set(mapped) != expected:
            raise ConversionError(f"weights do not fit the model: missing "
                                  f"{sorted(expected - set(mapped))[:5]}, unexpected "
                                  f"{sorted(set(mapped) - expected)[:5]}")
        own = model.state_dict()
        for k, v in mapped.items():
            if tuple(own[k].shape) != tuple(v.shape):
                raise ConversionError(f"{k}: HF shape {tuple(v.shape)} vs Megatron "
                                      f"{tuple(own[k].shape)}")
        model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=False)
        if ckpt.exists():
            shutil.rmtree(ckpt)
        ckpt.mkdir(parents=True)
        sd = {"model": model.sharded_state_dict(prefix="model.")}
        sd.update(step=0, consumed_tokens=0, counters={}, objective=HF_OBJECTIVE,
                  teacher_initialized=False, optimizer_saved=False,
                  model_signature=_model_signature(cfg, vocab), config=cfg.to_dict(),
                  hf_config=hf_cfg, hf_architecture=arch)
        _thread_queue()
        dist_checkpointing.save(sd, str(ckpt))
    (out / "latest").write_text(ckpt.name + "\n")
    model_yaml = {"model": {k: v for k, v in dataclasses.asdict(cfg.model).items()}}
    (out / "model.yaml").write_text(
        f"# model section matching {Path(hf_dir).name} ({arch}); merge into your run config\n"
        + yaml.safe_dump(model_yaml, sort_keys=False))
    return ckpt


def load_megatron(path: str | Path, weights: str = "policy"):
    """Load a checkpoint's policy (or EMA `teacher`) into a TP=1/PP=1 model on this process.

    Call with Megatron's process groups set up (world size 1), or through `megatron_to_hf`.

    Returns:
        (model, model fields dict, common state dict).
    """
    from megatron.core import dist_checkpointing

    from megatron_rlp.checkpoint import resolve_checkpoint
    from megatron_rlp.interop import names

    ckpt = resolve_checkpoint(str(path))
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    fields = dict((common.get("config") or {}).get("model") or {})
    if not fields:
        raise ConversionError(f"{ckpt}: no model config in the checkpoint")
    meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    rows = int(meta["model.embedding.word_embeddings.weight"].global_shape[0]) \
        if "model.embedding.word_embeddings.weight" in meta else None
    if rows is None:
        raise ConversionError(f"{ckpt}: no embedding in the checkpoint")
    fields["make_vocab_size_divisible_by"] = 1  # build exactly `rows` rows
    cfg = _run_config(fields)
    model = build_model(cfg, rows)
    prefix = {"policy": "model.", "teacher": "ema."}[weights]
    if weights == "teacher" and not common.get("teacher_initialized"):
        raise ConversionError(f"{ckpt} has no EMA teacher (teacher_initialized is false)")
    sharded = model.sharded_state_dict(prefix=prefix)
    names.match_checkpoint_names(sharded, ckpt)  # saved before the TE key map: local names
    with torch.no_grad():
        loaded = dist_checkpointing.load(sharded, str(ckpt))
    model.load_state_dict({k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)})
    fields = dataclasses.asdict(cfg.model)
    return model, fields, common


def real_vocab_size(common: dict, rows: int, vocab_size: int | None = None) -> int:
    """The ids an exported model keeps: rows past them are Megatron's vocabulary padding.

    Args:
        common: The checkpoint's common state (`hf_config`, `config.data.tokenizer`).
        rows: Embedding rows in the checkpoint (the padded vocabulary).
        vocab_size: Given by the user (`--vocab-size`); else the source HF config's
            `vocab_size` for a model imported by `hf_to_megatron`, else the size of the run's
            `data.tokenizer`.

    Raises:
        ConversionError: the size is not in 1..rows, or the run's tokenizer cannot be read.
    """
    if vocab_size is None and (common.get("hf_config") or {}).get("vocab_size"):
        vocab_size = int(common["hf_config"]["vocab_size"])
        if vocab_size > rows:  # e.g. trained with a smaller divisor than the import set
            vocab_size = None
    if vocab_size is None:
        from megatron_rlp.tokenizer import build_tokenizer

        spec = str(((common.get("config") or {}).get("data") or {}).get("tokenizer") or "byte")
        try:
            vocab_size = build_tokenizer(spec).vocab_size
        except (OSError, ValueError) as e:
            raise ConversionError(
                f"the run's data.tokenizer={spec} cannot be read to find the real vocabulary "
                f"({e}); allowed: run where that path resolves, or give --vocab-size N "
                f"(1..{rows})") from None
    if not 1 <= vocab_size <= rows:
        raise ConversionError(f"--vocab-size={vocab_size} (allowed: 1..{rows}, the "
                              "checkpoint's embedding rows)")
    return vocab_size


def megatron_to_hf(path: str | Path, out_dir: str | Path, template: str | Path | None = None,
                   weights: str = "policy", dtype: torch.dtype | None = None,
                   vocab_size: int | None = None) -> Path:
    """Export a checkpoint (a `train.save` root or a step directory) as a HF directory.

    Args:
        template: An HF directory whose config.json keys (token ids, ...) are kept and whose
            tokenizer files are copied; default: the config saved by `hf_to_megatron`, if any.
        weights: "policy" or "teacher" (the EMA copy).
        dtype: Cast the weights (e.g. torch.bfloat16); default: as trained (fp32).
        vocab_size: Rows to keep (see `real_vocab_size`); written as config `vocab_size`.
    """
    from megatron_rlp.config import RunConfig

    with _megatron(RunConfig()):
        model, fields, common = load_megatron(path, weights)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()
              if not k.endswith("_extra_state") and v is not None}
    arch = architecture_of_megatron(fields)
    base = common.get("hf_config") if common.get("hf_architecture") == arch else None
    if template is not None:
        base = json.loads((Path(template) / "config.json").read_text())
    keep = real_vocab_size(common, int(sd["embedding.word_embeddings.weight"].shape[0]),
                           vocab_size)
    for k in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if k in sd:  # [rows, hidden] -> [keep, hidden]: Megatron's padding rows go
            sd[k] = sd[k][:keep].clone()
    rows = keep
    spec = ARCHITECTURES[arch]
    check_megatron_model(fields, arch)
    hf_cfg = spec["hf_config"](fields, rows, base)
    check_hf_config(hf_cfg, arch, "megatron-to-hf")  # e.g. a template's YaRN or MoE keys
    if dtype is not None:
        hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf_sd = spec["to_hf"](sd, fields)
    return write_hf(out_dir, hf_cfg, hf_sd, template, dtype)
