"""A stock Megatron-LM pretraining script turned into RLP: Megatron-LM's own flags, its own
`pretrain()` loop, plus the `--rlp-*` group of megatron_rlp.plugin.

    # continue a Megatron-LM GPT/hybrid run with RLP (GPU, TE spec as usual)
    torchrun --nproc-per-node 8 examples/megatron_lm/pretrain_gpt_rlp.py \
        --use-checkpoint-args --load $CKPT --finetune --save $OUT \
        --tensor-model-parallel-size 2 --micro-batch-size 1 --global-batch-size 512 \
        --train-iters 500 --lr 1e-6 --lr-decay-style constant \
        --rlp-group-size 16 --rlp-max-thought-tokens 2048 --rlp-corpus $DATA_PREFIX \
        --rlp-tokenizer tokenizer.json

    # tiny model on CPU (one gloo process; add --rlp-device cpu and the CPU flags)
    python examples/megatron_lm/pretrain_gpt_rlp.py --rlp-device cpu ... (see README)

Compared with Megatron-LM's pretrain_gpt.py, what changes is: `extra_args_provider=add_rlp_args`,
and `pretrain()` gets the plugin's model provider, dataset provider and forward step.
`--global-batch-size` counts sequences: RLP contexts x `--rlp-group-size`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# Megatron's modules first (their torch.compile decorators run at import, before any backend).
from megatron.core.enums import ModelType  # noqa: E402
from megatron.training import arguments, get_args, global_vars, pretrain  # noqa: E402
from megatron.training.argument_utils import pretrain_cfg_container_from_args  # noqa: E402

from megatron_rlp.config import ConfigError  # noqa: E402
from megatron_rlp.plugin import RLPPlugin, add_rlp_args, hybrid_pattern_args  # noqa: E402
from megatron_rlp.startup import print_error  # noqa: E402


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`add_rlp_args`, then `--help` made to work: argparse %-formats every help string, and
    megatron-core 0.19's `--moe-paged-stash-buffer-size-factor-cuda` help ends in a bare
    "... (e.g. 1.10 = 10%)." which makes `--help` raise ValueError. A "%" that does not start
    a `%(name)s` field or a "%%" is escaped (the text shown is unchanged)."""
    parser = add_rlp_args(parser)
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = re.sub(r"%%|%\(\w+\)[a-z]|%",
                                 lambda m: m[0] if len(m[0]) > 1 else "%%", action.help)
    return parser


def main() -> None:
    args = arguments.parse_args(extra_args_provider=add_args)
    args.dataloader_type = "external"  # RLP draws its contexts itself, from (seed, iteration)
    hybrid_pattern_args(args)  # the policy is a HybridModel (`*-` x N for a GPT run)
    if args.rlp_device == "cpu" and "RANK" not in os.environ:  # one process without torchrun
        from megatron_rlp.distributed import _free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        args.rank, args.world_size = 0, 1
    arguments.validate_args(args)
    global_vars.set_global_variables(args)
    try:
        plugin = RLPPlugin(get_args())
    except ConfigError as e:  # one line (it names the project's key behind the --rlp-* flag)
        print_error(e)
        sys.exit(2)
    if args.rlp_device == "cpu":
        from megatron_rlp import distributed
        from megatron_rlp.backends.training_cpu import allow_pretrain_on_cpu

        distributed.setup_device(plugin.cfg)  # the CPU backend (backends/cpu.py)
        allow_pretrain_on_cpu()
    pretrain(pretrain_cfg_container_from_args(args), plugin.datasets_provider,
             ModelType.encoder_or_decoder, plugin.forward_step,
             model_provider=plugin.model_provider)


if __name__ == "__main__":
    main()
