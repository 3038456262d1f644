"""Build everything a run holds: tokenizer, corpus, policy (Megatron DDP), optimizer,
scheduler and the EMA teacher — all from Megatron-Core's own parts.

Precision follows Megatron-LM's `--bf16` path: the policy is built in bf16, each chunk is
wrapped in Megatron's `Float16Module` (bf16 inputs on the first stage, fp32 logits out of the
last) and then in DDP (fp32 gradient reduction), and `get_megatron_optimizer(bf16=True)`
keeps fp32 main weights. The EMA teacher is an fp32 model built from its own config.

Device: every module is built on the CPU (`use_cpu_initialization`, identical weights in
every layout) and then moved to `torch_device(cfg)` — `cuda:LOCAL_RANK` or `cpu` — before
DDP allocates its buffers there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_rlp.config import RunConfig
from megatron_rlp.data import IndexedCorpus, TokenizedCorpus, load_data
from megatron_rlp.distributed import torch_device
from megatron_rlp.models.fp8 import teacher_config
from megatron_rlp.models.provider import build_stage
from megatron_rlp.parallel.pipeline import ModelChunks, chunks_of
from megatron_rlp.scoring.ema_teacher import EMATeacher
from megatron_rlp.scoring.reference import FrozenReference
from megatron_rlp.tokenizer import Tokenizer, build_tokenizer


@dataclass
class TrainState:
    """What a training step reads and mutates."""

    cfg: RunConfig
    tokenizer: Tokenizer
    corpus: TokenizedCorpus | IndexedCorpus  # the train split (data/contexts.py: DocumentSource)
    model_chunks: list[DistributedDataParallel]  # the policy, wrapped: one per pipeline chunk
    policy: HybridModel | ModelChunks  # the same, unwrapped (rollouts: no DDP hooks)
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    teacher: EMATeacher | None  # RLP only, and not with rlp.teacher_scoring=off
    step: int = 0  # optimizer steps taken
    consumed_tokens: int = 0
    valid_corpus: TokenizedCorpus | IndexedCorpus | None = None  # held out (data.split)
    device: torch.device = torch.device("cpu")  # where every tensor of a step lives
    reference: FrozenReference | None = None  # KL reference, only with rlp.kl_coef > 0


def wrap_ddp(cfg: RunConfig, policy: HybridModel | ModelChunks) -> list[DistributedDataParallel]:
    """Megatron DDP around each chunk; as in Megatron-LM, only the first chunk's buckets may
    be split for overlap, the others hold one bucket each. bf16 chunks are first wrapped in
    `Float16Module`, as Megatron-LM's `get_model` does for `--bf16`."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        # FP8 weights all-gathered in FP8 (Megatron-LM's --fp8-param-gather; models/fp8.py).
        fp8_param_gather=cfg.precision.fp8_param_gather,
    )
    half = cfg.precision.params_dtype == "bf16"
    return [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config,
                                    module=Float16Module(chunk.config, chunk) if half else chunk,
                                    disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks_of(policy))]


def build_optimizer(cfg: RunConfig, model_chunks: list[DistributedDataParallel]
                    ) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    o = cfg.optimizer
    bf16 = cfg.precision.params_dtype == "bf16"
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ),
        model_chunks,
    )
    steps = max(cfg.train.steps, 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.lr_warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_steps, lr_decay_steps=max(steps, o.lr_warmup_steps + 1),
        lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant",
    )
    return optimizer, scheduler


def build_state(cfg: RunConfig) -> TrainState:
    """Everything for `cfg` on this rank (call after `distributed.initialize`)."""
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    d = cfg.data
    data = load_data(d.corpus, d.blend, d.split, tokenizer, cfg.train.seed, d.cache_dir)
    device = torch_device(cfg)
    policy = build_stage(cfg, tokenizer.vocab_size).to(device)
    chunks = wrap_ddp(cfg, policy)
    # Megatron's schedules call these hooks: DP/SP/embedding gradient reductions and loss scaling.
    optimizer, scheduler = build_optimizer(cfg, chunks)
    for chunk in chunks_of(policy):
        chunk.config.finalize_model_grads_func = finalize_model_grads
        chunk.config.grad_scale_func = optimizer.scale_loss
    teacher = None
    if cfg.train.objective == "rlp" and cfg.rlp.teacher_scoring != "off":
        # fp32 shadow from its own fp32 TransformerConfig (scoring/ema_teacher.py says why),
        # without FP8 parameters (models/fp8.py: teacher_config).
        teacher = EMATeacher(build_stage(teacher_config(cfg), tokenizer.vocab_size,
                                         params_dtype="fp32").to(device), cfg.rlp.ema_decay)
    reference = None
    if cfg.train.objective == "rlp" and cfg.rlp.kl_coef > 0:  # never allocated at beta = 0
        reference = FrozenReference(build_stage(teacher_config(cfg), tokenizer.vocab_size,
                                                params_dtype="fp32").to(device))
    return TrainState(cfg=cfg, tokenizer=tokenizer, corpus=data.train, model_chunks=chunks,
                      policy=policy, optimizer=optimizer, scheduler=scheduler, teacher=teacher,
                      valid_corpus=data.valid, device=device, reference=reference)
