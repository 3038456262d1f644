"""FP8 through Megatron's own TransformerConfig options, and bf16 rollouts under FP8 training.

Megatron does all the FP8 work: `HybridStack.forward` enters Transformer Engine's
`fp8_autocast` (Megatron's `fp8_utils.get_fp8_context`: one outer context for the delayed
recipe, one per layer otherwise, skipping the first/last `num_layers_at_*_in_bf16` layers),
and `HybridStack.__init__` builds the layers under `fp8_model_init` when `fp8_param` is set.
Nothing here re-implements that; `transformer_config_fp8` only maps `precision.*` to those
fields, and `bf16_forward` switches it off around a forward.

Why rollouts default to bf16 (`precision.fp8_rollouts: false`): Megatron decides per forward
from `config.fp8` whether to enter the FP8 autocast. A rollout forward under FP8 would sample
from a policy quantised differently from the update's (delayed scaling even updates its
amax history from rollout activations), and decode steps of a few rows fall below the FP8
GEMM alignment (TE pads or fails). Since the update recomputes its own log-probs as
`logp_old` (issue 10, part 3), rollouts in bf16 cost nothing in the ratio. The teacher's
scoring runs in bf16 for the same reason: S_pred and S_ema are then in one precision, and
so does the `entropy` position strategy's scorer (scoring/entropy.py), in training and in the
held-out evaluation's sampler.

What FP8 refuses (`PrecisionConfig.validate`, one line each), and what lifting it would take:

- `precision.fp8_param_gather` (Megatron's `fp8_param`): `HybridStack.__init__` would build
  the TE layers under `fp8_model_init`, but the provider builds every module on the CPU
  (`use_cpu_initialization`: identical weights in every layout) and moves it to the GPU
  after (train/builder.py), so TE would quantise CPU parameters. Lifting it needs a build on
  the device (`use_cpu_initialization=False` under `torch.device("cuda")`, Megatron's CUDA
  RNG tracker for the weights; a run that loads a checkpoint does not mind the init).
  `transformer_config_fp8` and the DDP flag still map the key for that day.
- `precision.fp8_rollouts`: TE's FP8 GEMMs need both dimensions of every input matrix to be
  multiples of 16 (`FP8_ALIGN`); a decode step feeds the rows left after compaction
  (rollout/thoughts.py, any count) and a prefill batch x its unpadded width. Lifting it
  needs every rollout and scoring forward padded to `FP8_ALIGN` rows (compaction keeping
  a multiple of finished rows, prompts left-padded to a multiple). `rollout_precision`
  keeps the switch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from torch import nn

from megatron_rlp.config import PrecisionConfig, RunConfig

# Megatron names of the fields `transformer_config_fp8` sets (tests check they exist).
FP8_FIELDS = ("fp8", "fp8_recipe", "fp8_param", "first_last_layers_bf16",
              "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16")

# TE's FP8 GEMMs need every dimension of the token x hidden matrix to be a multiple of 16
# (`transformer_engine.pytorch.quantization.get_align_size_for_quantization`: 16, 32 for mxfp8).
FP8_ALIGN = {"delayed": 16, "tensorwise": 16, "blockwise": 16, "mxfp8": 32}


def transformer_config_fp8(precision: PrecisionConfig) -> dict:
    """`precision.*` -> Megatron `TransformerConfig` keyword arguments (empty without FP8).

    `fp8_param_gather` is Megatron-LM's flag name; it sets `TransformerConfig.fp8_param` here
    and `DistributedDataParallelConfig.fp8_param_gather` in train/builder.py.
    """
    if precision.fp8 is None:
        return {}
    return {
        "fp8": precision.fp8,
        "fp8_recipe": precision.fp8_recipe,
        "fp8_param": precision.fp8_param_gather,
        "first_last_layers_bf16": precision.first_last_layers_bf16,
        "num_layers_at_start_in_bf16": precision.num_layers_at_start_in_bf16,
        "num_layers_at_end_in_bf16": precision.num_layers_at_end_in_bf16,
    }


def teacher_config(cfg: RunConfig) -> RunConfig:
    """The run config the EMA teacher is built from: the policy's without FP8 parameters.

    The teacher is an fp32 shadow (RLP.md); under `fp8_param` Megatron would build its GEMM
    weights as FP8 tensors (`fp8_model_init`), which an fp32 EMA cannot hold. Its forwards
    still follow `precision.fp8` / `fp8_rollouts` through `rollout_precision`.
    """
    if not cfg.precision.fp8_param_gather:
        return cfg
    return dataclasses.replace(
        cfg, precision=dataclasses.replace(cfg.precision, fp8_param_gather=False))


def token_multiple(precision: PrecisionConfig) -> int:
    """Sequence-length multiple an FP8 update batch needs (1 without FP8)."""
    return 1 if precision.fp8 is None else FP8_ALIGN[precision.fp8_recipe]


def _configs(models: tuple[nn.Module, ...]) -> list:
    """The distinct TransformerConfig objects that `models` (any wrappers, chunks) read."""
    seen: dict[int, object] = {}
    for model in models:
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "fp8"):
                seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def bf16_forward(*models: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run forwards of `models` without FP8: `config.fp8` is None inside, restored after.

    Megatron reads `config.fp8` at every forward (`HybridStack.forward`), so this turns the
    FP8 autocast off for exactly this block; parameters are untouched. With `fp8_param`
    (FP8 weights) TE dequantises them for the bf16 GEMM. A no-op when `enabled` is False or
    no config has FP8 set.

    Args:
        models: modules whose submodules carry a Megatron `config` (policy chunks, teacher).
        enabled: False leaves FP8 as configured (`precision.fp8_rollouts: true`).
    """
    configs = [c for c in _configs(models) if c.fp8] if enabled else []
    saved = [c.fp8 for c in configs]
    for c in configs:
        c.fp8 = None
    try:
        yield
    finally:
        for c, fp8 in zip(configs, saved, strict=True):
            c.fp8 = fp8


def rollout_precision(precision: PrecisionConfig, *models: nn.Module):
    """The context a rollout / teacher scoring runs in: bf16 unless `precision.fp8_rollouts`."""
    return bf16_forward(*models, enabled=precision.fp8 is not None and not precision.fp8_rollouts)
