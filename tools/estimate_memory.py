"""Per-rank memory estimate of an RLP run, on the command line (the model of what one GPU
holds is `megatron_rlp/train/memory.py`, whose docstring lists its terms).

    python tools/estimate_memory.py --config examples/configs/qwen3_1p7b.yaml --world-size 32 \\
        device.type=cuda precision.params_dtype=bf16 rlp.contexts_per_step=512 \\
        rlp.group_size=16 rlp.max_thought_tokens=2048 train.micro_batch_size=1

Overrides are the training command's own `section.key=value` (the launch scripts pass the
same ones). Prints a table (or `--json`) of what one GPU holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rlp.config import ConfigError, RunConfig, load_config  # noqa: E402
from megatron_rlp.train.memory import (  # noqa: E402,F401  (tests read them here)
    GIB,
    Shapes,
    attention_kind,
    estimate,
    parameter_counts,
    shapes,
    table,
)


def number(kind: type, low: float, *, above: bool = False):
    """An argparse `type`: `kind` (int or float) >= `low` (> `low` with `above`); anything
    else is refused with the value and the bound (argparse's one `error:` line, exit 2)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} (allowed: {kind.__name__})") from None
        if value < low or (above and value == low):
            raise argparse.ArgumentTypeError(
                f"{text} (allowed: {'>' if above else '>='} {low})")
        return value

    return parse


def _vocab_size(cfg: RunConfig, override: int | None) -> int:
    """The tokenizer's vocabulary (thought markers included), as training builds it."""
    if override:
        return override
    from megatron_rlp.tokenizer import build_tokenizer

    try:
        return build_tokenizer(cfg.data.tokenizer).vocab_size
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"error: cannot load tokenizer {cfg.data.tokenizer!r} ({e}); "
                         "pass --vocab-size") from None


def _load(config: str | None, overrides: list[str], world_size: int, validate: bool) -> RunConfig:
    if validate:
        return load_config(config, tuple(overrides), world_size=world_size)
    # The same parser as training, minus the final validation (layouts the trainer refuses
    # today, e.g. pipeline-parallel RLP, can still be sized).
    import yaml

    from megatron_rlp.config import loading as C

    cfg = RunConfig()
    if config:
        for key, value in C._flatten(yaml.safe_load(Path(config).read_text()) or {}):
            C._apply(cfg, key, value)
    for item in overrides:
        key, value = item.split("=", 1)
        C._apply(cfg, key.strip(), value.strip())
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (as for pretrain_rlp.py)")
    parser.add_argument("--world-size", type=number(int, 1), default=1, help="total ranks (GPUs)")
    parser.add_argument("--gpu-gib", type=number(float, 0, above=True), default=80.0,
                        help="memory of one GPU in GiB (H100 80GB: 80)")
    parser.add_argument("--attention", choices=("auto", "unfused", "flash"), default="auto",
                        help="prefill/scoring attention: unfused (the local spec's "
                        "materialised softmax), flash (fused); auto: as start-up checks it "
                        "(flash with Transformer Engine layers here). The packed update's "
                        "FlexAttention keeps no scores either way")
    parser.add_argument("--overhead-gib", type=number(float, 0), default=None,
                        help="CUDA context, NCCL, allocator slack (default 4 on cuda, 0.5 on cpu)")
    parser.add_argument("--vocab-size", type=number(int, 1), default=None,
                        help="tokenizer vocabulary (default: read data.tokenizer)")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip the config's cross-checks (size layouts the trainer refuses)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for training")
    args = parser.parse_args(argv)
    try:
        cfg = _load(args.config, args.overrides, args.world_size, not args.no_validate)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    if args.world_size % (tp * pp):
        print(f"error: world size {args.world_size} is not a multiple of TP*PP={tp * pp}",
              file=sys.stderr)
        return 2
    attention = args.attention
    if attention == "auto":  # the rule start-up applies (startup.check_memory)
        from megatron_rlp.backends.transformer_engine import transformer_engine_available

        attention = attention_kind(cfg, transformer_engine_available())
    est = estimate(cfg, args.world_size, _vocab_size(cfg, args.vocab_size), attention,
                   args.overhead_gib)
    est["gpu_gib"] = args.gpu_gib
    est["fits"] = est["total"] <= args.gpu_gib * GIB
    if args.json:
        print(json.dumps(est, indent=2))
    else:
        print(table(est, args.gpu_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
