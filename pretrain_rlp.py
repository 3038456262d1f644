"""RLP pretraining on Megatron-Core: sample a thought before each predicted token, reward it
by the information it adds about the real next token (see README.md).

    torchrun --nproc-per-node 2 pretrain_rlp.py --config examples/configs/tiny_cpu.yaml \
        rlp.group_size=4 train.steps=20

Everything after the config file is a `section.key=value` override; `--config` may be given
several times (later files win key by key). The config is validated
before torch.distributed starts, with the world size of the launcher (torchrun or srun): a bad
value exits 2 with one line naming it, printed by global rank 0 only. Exit codes: 0 done or
stopped cleanly, 1 non-finite steps, 2 bad config / data / checkpoint, 3 a step or save that
hung past train.watchdog_minutes (every thread's stack printed, tagged with the rank).
torchrun adds its own failure report when a worker exits non-zero; `--check-world-size N`
validates for N ranks in one process first (exit 0 or 2 with the one line), the memory
estimate included for device.type=cuda where the GPU or `device.memory_gib` says how much
one GPU holds.
"""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} (allowed: a world size >= 1)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", help="YAML config file (sections: model, "
                        "parallel, rlp, optimizer, data, train, device, precision); repeat it "
                        "to merge several, later files winning key by key (e.g. the run's, "
                        "then a converted checkpoint's model.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--check-world-size", type=_positive_int, metavar="N",
                        help="only validate the config for N ranks (no launcher needed) and "
                        "exit: 0 valid, 2 with the one-line error")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options too

    from megatron_rlp.config import ConfigError
    from megatron_rlp.startup import (
        check_memory,
        check_run_start,
        load_config,
        load_launch_config,
        print_error,
        quiet_megatron,
    )

    if args.check_world_size is not None:
        try:
            cfg = load_config(args.config, tuple(args.overrides),
                              world_size=args.check_world_size)
            check_run_start(cfg)
            memory = check_memory(cfg, args.check_world_size)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"config valid for {args.check_world_size} rank(s)"
              + ("" if cfg.device.type == "cpu" else f"; {memory}"))
        return 0
    try:
        cfg = load_launch_config(args.config, tuple(args.overrides))
    except SystemExit as e:  # a bad config: its one-line error is printed
        return int(e.code)

    quiet_megatron()
    from megatron_rlp import distributed
    from megatron_rlp.checkpoint import CheckpointError
    from megatron_rlp.train.faults import DataError, TrainingError
    from megatron_rlp.train.loop import train

    distributed.initialize(cfg)
    try:
        train(cfg)  # a clean stop (signal, wall time, exit_interval) also returns: exit 0
    except (CheckpointError, DataError, TrainingError) as e:
        # Raised on every rank alike; one line from global rank 0, the same exit code on
        # every rank, no traceback.
        print_error(e)
        return 1 if isinstance(e, TrainingError) else 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
