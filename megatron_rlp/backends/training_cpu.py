"""What `megatron.training.pretrain()` needs on the CPU backend (backends/cpu.py), beyond it.

Measured with megatron-core 0.19.2 (examples/megatron_lm/pretrain_gpt_rlp.py, one gloo
process): with these three patches and the flags below, `pretrain()` builds the model, DDP
and optimizer, trains, logs and checkpoints on CPU. Each blocker, in the order met:

1. `initialize_megatron` asserts `torch.cuda.is_available()` ("Megatron requires CUDA.");
   `pretrain()` calls it without `allow_no_cuda`. Patch: call it with `allow_no_cuda=True`.
   (Making `is_available()` return True instead breaks torch Adam's graph-capture check.)
2. `_compile_dependencies` runs `compile_helpers()`, which runs `make` in
   `megatron/core/datasets`; the wheel ships the built `helpers_cpp` but no Makefile, so it
   fails. Patch: no-op (nothing to compile).
3. `set_jit_fusion_options` warms up the fused bias-GeLU/SwiGLU kernels with torch.compile on
   "cuda" tensors whatever `--no-bias-*-fusion` says; dynamo trips over the CPU backend's
   torch.cuda stubs. Patch: no-op (fusions are off on CPU).

Flags it also needs (no patch): `--distributed-backend gloo`, `--transformer-impl local`,
`--no-rope-fusion --no-gradient-accumulation-fusion --no-masked-softmax-fusion
--no-bias-dropout-fusion --no-bias-swiglu-fusion --no-bias-gelu-fusion
--no-persist-layer-norm`, `--use-cpu-initialization`, `--num-workers 0` (DataLoader worker
processes query the CUDA device), `--dataloader-type external` (Megatron's DataLoader pins
memory, which needs a GPU; the RLP plugin brings its own data anyway).

The smallest upstream change that would lift 1-3: `pretrain(..., allow_no_cuda=...)` passed
through to `initialize_megatron`, and skipping `compile_helpers` / the JIT warm-up when the
device is not CUDA.
"""

from __future__ import annotations


def allow_pretrain_on_cpu() -> None:
    """Apply the three patches above (idempotent). Call before `pretrain()`."""
    import megatron.core.datasets.utils as dataset_utils
    from megatron.training import training

    if getattr(training.initialize_megatron, "_rlp_cpu", False):
        return
    original = training.initialize_megatron

    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    initialize_megatron._rlp_cpu = True
    training.initialize_megatron = initialize_megatron
    dataset_utils.compile_helpers = lambda: None
    training.set_jit_fusion_options = lambda *args, **kwargs: None
