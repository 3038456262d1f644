"""The Megatron-LM side of the interop tests: models built and checkpoints written and read the
way a Megatron-LM run does it — `megatron.training.arguments.parse_args` over Megatron-LM
flags, `core_transformer_config_from_args`, `megatron.training.checkpointing.save_checkpoint`
and `load_checkpoint` — on the CPU backend (one gloo process, set up by the caller).

What differs from a GPU Megatron-LM run, and why: `--transformer-impl local` (Transformer
Engine does not run on CPU; Megatron's local GPT spec writes TE's key names through its
`sharded_state_dict_keys_map`), fused kernels off (CUDA only), and for hybrid models the
layer spec is this project's local one (Megatron's hybrid spec is TE-only) inside Megatron's
own `HybridModel`. MoE: local experts (`SequentialMLP`; a GPU run's grouped GEMM stores the
same keys) and the pre-MoE norm under its own name, as TE's MoE layer keeps it (Megatron's
local GPT spec would rename it to the dense MLP's fused-norm key, which no TE run writes).
"""

from __future__ import annotations

import contextlib
import io
import sys

import torch

# Megatron's modules run torch.compile decorators at import: import them before the CPU
# backend patches torch.cuda (megatron_rlp/backends/cpu.py).
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.training import arguments, checkpointing, global_vars
from megatron.training.arguments import core_transformer_config_from_args

from megatron_rlp.interop.megatron_lm_export import save_with_megatron_lm
from megatron_rlp.models.local_spec import local_hybrid_stack_spec
from megatron_rlp.models.provider import squared_relu_eager

CPU_FLAGS = ["--transformer-impl", "local", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
             "--no-masked-softmax-fusion", "--no-bias-dropout-fusion", "--no-persist-layer-norm",
             "--no-bias-swiglu-fusion", "--no-bias-gelu-fusion",
             "--use-cpu-initialization", "--micro-batch-size", "1", "--ckpt-format", "torch_dist",
             "--attention-dropout", "0", "--hidden-dropout", "0", "--save-interval", "1",
             "--train-iters", "1", "--lr", "1e-4"]

DENSE_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
               "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
               "--qk-layernorm", "--swiglu", "--normalization", "RMSNorm", "--norm-epsilon", "1e-6",
               "--position-embedding-type", "rope", "--rotary-base", "1000000",
               "--untie-embeddings-and-output-weights", "--disable-bias-linear",
               "--seq-length", "256", "--max-position-embeddings", "256",
               "--make-vocab-size-divisible-by", "64"]

HYBRID_FLAGS = ["--is-hybrid-model", "--hybrid-layer-pattern", "M-M*-M-", "--hidden-size", "64",
                "--ffn-hidden-size", "128", "--num-attention-heads", "4",
                "--group-query-attention", "--num-query-groups", "2", "--squared-relu",
                "--normalization", "RMSNorm", "--norm-epsilon", "1e-5",
                "--position-embedding-type", "none", "--disable-bias-linear",
                "--mamba-num-heads", "8", "--mamba-head-dim", "16", "--mamba-state-dim", "16",
                "--mamba-num-groups", "2", "--seq-length", "256",
                "--max-position-embeddings", "256",
                "--make-vocab-size-divisible-by", "64"]


# A Qwen3-MoE-shaped GPT model (pretrain_gpt.py --num-experts): every MLP an MoE, softmax router.
MOE_FLAGS = [*DENSE_FLAGS, "--num-experts", "8", "--moe-router-topk", "2",
             "--moe-ffn-hidden-size", "32", "--moe-token-dispatcher-type", "alltoall"]

# A Nemotron-3-shaped hybrid: sigmoid router with expert bias and scaling, a shared expert.
HYBRID_MOE_FLAGS = [*HYBRID_FLAGS[:HYBRID_FLAGS.index("M-M*-M-")], "MEM*E",
                    *HYBRID_FLAGS[HYBRID_FLAGS.index("M-M*-M-") + 1:],
                    "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
                    "--moe-shared-expert-intermediate-size", "48",
                    "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                    "--moe-router-topk-scaling-factor", "2.5", "--moe-router-dtype", "fp32",
                    "--moe-token-dispatcher-type", "alltoall"]


def parse(argv: list[str], validate: bool = True):
    saved = sys.argv
    sys.argv = ["pretrain_x.py", *argv]
    try:
        args = arguments.parse_args()
    finally:
        sys.argv = saved
    if validate:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every setting
            arguments.validate_args(args)
    return args


def build_model(args, padded_vocab: int):
    """The model a Megatron-LM entry script builds for these args (GPT or hybrid)."""
    config = core_transformer_config_from_args(args)
    if args.squared_relu:  # Megatron's is torch.compile'd: no compiler on this CPU backend
        config.activation_func = squared_relu_eager
    common = dict(config=config, vocab_size=padded_vocab,
                  max_sequence_length=args.max_position_embeddings,
                  position_embedding_type=args.position_embedding_type,
                  rotary_base=args.rotary_base,
                  share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    if args.hybrid_layer_pattern:
        return HybridModel(hybrid_stack_spec=local_hybrid_stack_spec(args.qk_layernorm,
                                                                     args.normalization),
                           hybrid_layer_pattern=args.hybrid_layer_pattern, **common)
    spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm,
                                    normalization=args.normalization,
                                    num_experts=args.num_experts, moe_grouped_gemm=False)
    if args.num_experts:  # TE's MoE layer keeps `pre_mlp_layernorm` (see the docstring)
        spec.submodules.sharded_state_dict_keys_map.pop("pre_mlp_layernorm.")
    return GPTModel(transformer_layer_spec=spec, **common)


def write_checkpoint(flags: list[str], save: str, padded_vocab: int, iteration: int, seed: int):
    """A Megatron-LM run's checkpoint: random model, `save_checkpoint`; returns the model."""
    args = parse(flags + CPU_FLAGS + ["--save", save, "--no-save-optim", "--no-save-rng"])
    args.padded_vocab_size = padded_vocab
    torch.manual_seed(seed)
    model = build_model(args, padded_vocab)
    with torch.no_grad():  # Megatron zero-inits some norms; make every tensor count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in model.named_buffers():  # a trained router's selection bias
            if name.endswith("expert_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    save_with_megatron_lm([model], args, iteration)
    return model.eval()


def load_with_megatron_lm(load: str, flags: list[str]):
    """Megatron-LM's `--use-checkpoint-args` + `load_checkpoint` into a fresh model, as a
    continued-pretraining / SFT run starts (`--finetune`: model only, iteration 0). `flags`:
    model flags that `--use-checkpoint-args` does not copy (e.g. `--qk-layernorm`)."""
    # initialize_megatron's order: parse, load_args_from_checkpoint, validate_args.
    args = parse(CPU_FLAGS + flags + ["--load", load, "--use-checkpoint-args", "--finetune",
                              "--no-load-optim", "--no-load-rng", "--exit-on-missing-checkpoint"],
                 validate=False)
    args, ckpt_args = checkpointing.load_args_from_checkpoint(args)
    with contextlib.redirect_stdout(io.StringIO()):
        arguments.validate_args(args)
    global_vars.set_args(args)
    try:
        model = build_model(args, args.padded_vocab_size)
        with contextlib.redirect_stdout(io.StringIO()):
            iteration, _ = checkpointing.load_checkpoint([model], None, None, strict=True)
    finally:
        global_vars.set_args(None)
    return model.eval(), iteration, ckpt_args


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None).float()
