"""Convert between Hugging Face models and megatron-rlp checkpoints (Qwen3, Nemotron-H).

    # HF -> Megatron: a warm-start checkpoint for `train.load`, plus OUT/model.yaml
    python tools/convert_checkpoint.py hf-to-megatron --hf-dir Qwen3-1.7B-Base \
        --out runs/qwen3_init --tokenizer Qwen3-1.7B-Base/tokenizer.json

    # Megatron -> HF: model.safetensors + config.json (+ tokenizer files of --template);
    # the vocabulary is the real one (Megatron's padding rows cut, see convert/checkpoints.py)
    python tools/convert_checkpoint.py megatron-to-hf --checkpoint runs/rlp \
        --out exported/ --template Qwen3-1.7B-Base [--weights teacher] [--dtype bf16]

    # this project's checkpoint -> Megatron-LM torch_dist (tracker file, iter_*/, args, TE names)
    python tools/convert_checkpoint.py megatron-to-megatron-lm --checkpoint runs/rlp \
        --out runs/rlp_mlm [--layout hybrid|gpt] [--weights teacher]

A config field the converter does not model (YaRN or other RoPE scaling, a sliding window,
biases, MoE settings on a dense model, ...) is refused: one `error:` line naming the field
and value, exit code 2 (megatron_rlp/convert/refusals.py). An existing, non-empty --out is
refused unless --overwrite.

Runs in one CPU process (no GPU, no network); the Megatron side may use any TP/PP when
training: dist_checkpointing reshards at load. Needs `safetensors` (pip install
megatron-rlp[convert]).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF directory -> warm-start checkpoint")
    a.add_argument("--hf-dir", required=True, help="local directory with config.json and "
                   "*.safetensors")
    a.add_argument("--out", required=True, help="checkpoint root to write (train.load=OUT)")
    a.add_argument("--tokenizer", help="the data.tokenizer to train with (checked to fit)")
    a.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty "
                   "--out (its step_00000000, latest and model.yaml replaced)")
    b = sub.add_parser("megatron-to-hf", help="checkpoint -> HF directory")
    b.add_argument("--checkpoint", required=True, help="a train.save root or a step_* dir")
    b.add_argument("--out", required=True, help="HF directory to write")
    b.add_argument("--template", help="HF directory: config keys kept, tokenizer files copied")
    b.add_argument("--weights", choices=("policy", "teacher"), default="policy")
    b.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    b.add_argument("--vocab-size", type=int, help="embedding/output rows to keep (default: the "
                   "source HF config's vocab_size, else the run's data.tokenizer size; "
                   "Megatron's padding rows past it are cut)")
    b.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty "
                   "--out (model.safetensors, config.json and tokenizer files replaced)")
    c = sub.add_parser("megatron-to-megatron-lm", help="checkpoint -> Megatron-LM torch_dist "
                       "checkpoint (pretrain_hybrid.py, or pretrain_gpt.py with --layout gpt)")
    c.add_argument("--checkpoint", required=True, help="a train.save root or a step_* dir")
    c.add_argument("--out", required=True, help="Megatron-LM save directory to write")
    c.add_argument("--layout", choices=("hybrid", "gpt"), default="hybrid",
                   help="HybridModel (any pattern) or GPTModel (patterns of '*-' or '*E' repeated)")
    c.add_argument("--weights", choices=("policy", "teacher"), default="policy")
    c.add_argument("--iteration", type=int, help="iteration to record (default: the step)")
    c.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty "
                   "--out as a Megatron-LM run saves again (that iteration replaced, others "
                   "kept, the tracker pointed at it)")
    args = parser.parse_args(argv)
    if not args.overwrite and Path(args.out).is_dir() and any(Path(args.out).iterdir()):
        print(f"error: --out={args.out} is not empty (allowed: a new or empty directory, or "
              "add --overwrite to write into it)", file=sys.stderr)
        return 2

    if args.command == "megatron-to-megatron-lm" and args.iteration is not None \
            and args.iteration < 0:
        print(f"error: --iteration={args.iteration} (allowed: an integer >= 0)", file=sys.stderr)
        return 2

    warnings.filterwarnings("ignore")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    import torch

    from megatron_rlp.checkpoint import CheckpointError, resolve_checkpoint
    from megatron_rlp.convert import ConversionError, hf_to_megatron, megatron_to_hf

    try:
        # Resolved here, so that a bad path is named by the flag the user gave (--checkpoint),
        # not by the train.load key the library's message uses.
        if args.command != "hf-to-megatron":
            args.checkpoint = str(resolve_checkpoint(args.checkpoint, "--checkpoint"))
        if args.command == "megatron-to-megatron-lm":
            from megatron_rlp.interop.megatron_lm_export import export_megatron_lm

            out, flags = export_megatron_lm(args.checkpoint, args.out, args.layout, args.weights,
                                            args.iteration)
            print(f"wrote {out} (Megatron-LM --load {shlex.quote(args.out)} --ckpt-format "
                  "torch_dist)")
            print("Megatron-LM model flags: " + shlex.join(flags))
        elif args.command == "hf-to-megatron":
            ckpt = hf_to_megatron(args.hf_dir, args.out, args.tokenizer)
            print(f"wrote {ckpt} (train.load={args.out}); model section: {args.out}/model.yaml")
        else:
            dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
            out = megatron_to_hf(args.checkpoint, args.out, args.template, args.weights, dtype,
                                 args.vocab_size)
            print(f"wrote {out}/model.safetensors and config.json")
    except (ConversionError, CheckpointError, ValueError) as e:  # input it does not model: exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
