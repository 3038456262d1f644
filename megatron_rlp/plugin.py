"""RLP as a plugin for Megatron-LM's `megatron.training.pretrain()`.

A stock Megatron-LM script becomes RLP by handing `pretrain()` this plugin's model provider,
dataset provider and forward step (examples/megatron_lm/pretrain_gpt_rlp.py):

    plugin = RLPPlugin(get_args())
    pretrain(cfg_container, plugin.datasets_provider, ModelType.encoder_or_decoder,
             plugin.forward_step, model_provider=plugin.model_provider)

Megatron-LM keeps its loop: micro-batches, DDP, optimizer, scheduler, logging, checkpoints,
`--load`/`--save`, TP/PP/DP from its own flags. The plugin supplies:

- `forward_step(data_iterator, model) -> (output, loss_func)` as `pretrain()` expects. On an
  iteration's first micro-batch it runs the RLP rollout for the whole local batch (contexts
  from (seed, iteration), G thoughts each, `S_pred`), scores the targets with the EMA teacher
  (`S_ema`), forms rewards and group advantages, and cuts the update sequences into
  micro-batches; every call then returns the policy forward of one micro-batch and the clipped
  surrogate loss. The pieces are this project's own (data/, rollout/, scoring/, objective/,
  train/rlp_update.py's update batches, forward step and loss), so a step computes what
  `pretrain_rlp.py`'s does.
- The EMA teacher phi <- tau*phi + (1-tau)*theta after each optimizer step. `pretrain()` has no
  hook after the optimizer step; the update is applied when the teacher is next needed: at the
  next iteration's first micro-batch (before its scoring) or when a checkpoint is written. Both
  come after the step, so the teacher is exactly the one `pretrain_rlp.py` holds.
- The teacher in Megatron's checkpoint: the policy's `sharded_state_dict` also holds the
  teacher under `ema.` keys, and its `load_state_dict` restores them; a checkpoint without them
  (a pretraining run's) warm-starts with the teacher lazily copied from the policy.

`--global-batch-size` is the step's sequences (`rlp contexts x --rlp-group-size`), and
`--micro-batch-size` the sequences (thought rows) per update micro-batch. With shared prefixes
(the default) and a micro-batch size that is a multiple or a divisor of a document's rows, the
update is `pretrain_rlp.py`'s branch-packed one (packing/update.py; core attention per
`--rlp-packed-attention`): a micro-batch packs the same thought rows, so Megatron's
micro-batch count does not change. Otherwise every row is its own sequence.

Why not a change to Megatron-LM's loop: STYLE.md asks to keep RLP out of `training.py`; a
forward step is the extension point Megatron-LM scripts already use.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches

from megatron_rlp import startup
from megatron_rlp.config import ConfigError, RunConfig
from megatron_rlp.data import load_data
from megatron_rlp.data.batches import split_microbatches, trimmed_microbatches, update_batch
from megatron_rlp.distributed import torch_device
from megatron_rlp.interop.megatron_lm import architecture
from megatron_rlp.models.provider import build_model, transformer_config, unwrap_model
from megatron_rlp.packing.tree import PAD
from megatron_rlp.scoring.ema_teacher import EMATeacher
from megatron_rlp.tokenizer import build_tokenizer
from megatron_rlp.train.builder import TrainState
from megatron_rlp.train.reduce import gather_data_parallel
from megatron_rlp.train.rlp_step import rollout_and_score
from megatron_rlp.train.rlp_update import (
    packed_attention,
    packed_microbatches,
    rlp_forward_step,
    update_layout,
)
from megatron_rlp.train.samplers import make_context_sampler

_EMA = "ema."


def add_rlp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `--rlp-*` group (Megatron-LM's `extra_args_provider` signature)."""
    g = parser.add_argument_group("RLP", "RLP stage (megatron_rlp.plugin)")
    g.add_argument("--rlp-group-size", type=int, default=4, help="thoughts per context (G)")
    g.add_argument("--rlp-max-thought-tokens", type=int, default=16)
    g.add_argument("--rlp-temperature", type=float, default=0.7)
    g.add_argument("--rlp-top-p", type=float, default=1.0)
    g.add_argument("--rlp-ema-decay", type=float, default=0.999, help="teacher tau")
    g.add_argument("--rlp-clip-eps", type=float, nargs=2, default=(0.2, 0.2),
                   metavar=("LOW", "HIGH"))
    g.add_argument("--rlp-prefix-tokens", type=int, nargs=2, default=(32, 128),
                   metavar=("MIN", "MAX"), help="context prefix length range")
    g.add_argument("--rlp-logp-old-source", choices=("update", "rollout"), default="update",
                   help="the ratio's denominator (rlp.logp_old_source)")
    g.add_argument("--rlp-tis-cap", type=float, default=2.0,
                   help="truncated importance weight cap with --rlp-logp-old-source rollout")
    g.add_argument("--rlp-no-share-prefixes", action="store_false", dest="rlp_share_prefixes",
                   help="prefill every context's prefix itself and update per sequence "
                        "(rlp.share_prefixes=false; default: shared prefill, packed update)")
    g.add_argument("--rlp-packed-attention", choices=("auto", "flex", "mask", "split"),
                   default="auto",
                   help="core attention of the packed update (model.packed_attention)")
    g.add_argument("--rlp-corpus", default="data/corpus.jsonl",
                   help="RLP documents: .jsonl/.txt or an indexed-dataset prefix")
    g.add_argument("--rlp-tokenizer", default="byte",
                   help="`byte` or a tokenizer.json (with <think>, </think>)")
    g.add_argument("--rlp-metrics-file", default=None, help="JSON lines, pretrain_rlp.py's keys")
    g.add_argument("--rlp-device", choices=("cuda", "cpu"), default="cuda")
    g.add_argument("--rlp-num-threads", type=int, default=0,
                   help="CPU threads per rank (device.num_threads; 0: cores / local ranks)")
    return parser


def hybrid_pattern_args(args: argparse.Namespace) -> None:
    """Before `validate_args`: a GPT-style run (`--num-layers N`, no pattern) becomes the
    HybridModel pattern `*-` x N the plugin builds. The run's checkpoints then record the
    pattern (so they resume as hybrid), and a GPT pretraining checkpoint in `--load` goes
    through Megatron-LM's own GPT-to-hybrid loading."""
    if not (args.hybrid_layer_pattern or args.hybrid_override_pattern):
        args.hybrid_layer_pattern = "*-" * args.num_layers
        args.is_hybrid_model = True


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """This project's config for a Megatron-LM run: the model, layout, optimizer and seed from
    Megatron-LM's args, the RLP settings from the `--rlp-*` group. Validated as any config.

    Raises:
        megatron_rlp.config.ConfigError: a bad value (one line naming it).
    """
    cfg = RunConfig()
    fields, _, _ = architecture(args)
    for key, value in fields.items():
        setattr(cfg.model, key, value)
    cfg.model.make_vocab_size_divisible_by = args.make_vocab_size_divisible_by
    cfg.model.init_method_std = args.init_method_std
    cfg.model.packed_attention = args.rlp_packed_attention
    p = cfg.parallel
    p.tensor_model_parallel_size = args.tensor_model_parallel_size
    p.pipeline_model_parallel_size = args.pipeline_model_parallel_size
    p.virtual_pipeline_model_parallel_size = args.virtual_pipeline_model_parallel_size
    p.sequence_parallel = args.sequence_parallel
    p.use_distributed_optimizer = args.use_distributed_optimizer
    r = cfg.rlp
    r.group_size = args.rlp_group_size
    r.contexts_per_step = args.global_batch_size // args.rlp_group_size
    r.max_thought_tokens = args.rlp_max_thought_tokens
    r.temperature, r.top_p, r.ema_decay = args.rlp_temperature, args.rlp_top_p, args.rlp_ema_decay
    r.clip_eps_low, r.clip_eps_high = args.rlp_clip_eps
    r.min_prefix_tokens, r.max_prefix_tokens = args.rlp_prefix_tokens
    r.logp_old_source, r.tis_cap = args.rlp_logp_old_source, args.rlp_tis_cap
    r.share_prefixes = args.rlp_share_prefixes
    o = cfg.optimizer
    o.lr, o.min_lr, o.weight_decay, o.clip_grad = args.lr, args.min_lr, args.weight_decay, \
        args.clip_grad
    o.adam_beta1, o.adam_beta2, o.adam_eps = args.adam_beta1, args.adam_beta2, args.adam_eps
    cfg.data.corpus, cfg.data.tokenizer = args.rlp_corpus, args.rlp_tokenizer
    cfg.train.seed, cfg.train.steps = args.seed, args.train_iters
    cfg.train.micro_batch_size = args.micro_batch_size
    cfg.device.type, cfg.device.num_threads = args.rlp_device, args.rlp_num_threads
    # Megatron-LM's --bf16 (Float16Module, fp32 main weights); --fp16 has no RLP path.
    if getattr(args, "fp16", False):
        raise ConfigError("invalid config: --fp16 (allowed: --bf16 or fp32; RLP has no fp16 "
                          "loss-scaling path)")
    cfg.precision.params_dtype = "bf16" if getattr(args, "bf16", False) else "fp32"
    return startup.validate(cfg, args.world_size)  # the pure rules, then this machine


class _TeacherInCheckpoint:
    """Mixed into the policy's class: the EMA teacher travels in Megatron's checkpoint."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        plugin = self.__dict__["_rlp_plugin"]
        if plugin.teacher_in_checkpoint():
            # keys `ema.<prefix>...`, tensors `ema.`-prefixed: beside the policy's, not in it
            sd.update(plugin.teacher.model.sharded_state_dict(f"{prefix}{_EMA}", sharded_offsets,
                                                              metadata))
        return sd

    def load_state_dict(self, state_dict, strict=True):
        plugin = self.__dict__["_rlp_plugin"]
        ema = {k[len(_EMA):]: v for k, v in state_dict.items() if k.startswith(_EMA)}
        if ema:
            plugin.teacher.model.load_state_dict(ema, strict=strict)
            plugin.teacher.initialized = True
        return super().load_state_dict(
            {k: v for k, v in state_dict.items() if not k.startswith(_EMA)}, strict=strict)


class RLPPlugin:
    """Model provider, dataset provider and forward step that make `pretrain()` run RLP.

    Args:
        args: Megatron-LM's parsed args (with the `--rlp-*` group), after
            `set_global_variables`; torch.distributed need not be up yet.
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cfg = run_config_from_args(args)
        self.tokenizer = build_tokenizer(self.cfg.data.tokenizer)
        self.teacher: EMATeacher | None = None
        self.policy = None
        self._state: TrainState | None = None
        self._sampler = None
        self._pending_update = False  # an optimizer step ran since the teacher's last update
        self._calls = 0
        self._microbatches: list[dict] = []
        self._metrics: dict = {}
        self._losses: list[dict] = []

    # --- pretrain() providers ---------------------------------------------------------

    def model_provider(self, pre_process: bool = True, post_process: bool = True,
                       vp_stage: int | None = None, **_unused):
        """This rank's policy (this project's `build_model`: local or TE spec, seeded init),
        plus its EMA teacher of the same layout."""
        if vp_stage is not None:
            raise ValueError("the RLP plugin runs without a virtual pipeline (use pretrain_rlp.py "
                             "for --num-layers-per-virtual-pipeline-stage)")
        vocab = self.tokenizer.vocab_size
        policy = build_model(self.cfg, vocab, pre_process, post_process)
        # The fp32 shadow is built from its own fp32 TransformerConfig (scoring/ema_teacher.py).
        self.teacher = EMATeacher(build_model(self.cfg, vocab, pre_process, post_process,
                                              config=transformer_config(self.cfg, "fp32")
                                              ).to(torch_device(self.cfg)),
                                  self.cfg.rlp.ema_decay)
        policy.__class__ = type("RLPPolicy", (_TeacherInCheckpoint, type(policy)), {})
        policy.__dict__["_rlp_plugin"] = self  # not a submodule: no optimizer, no DDP
        self.policy = policy
        self._loading_teacher = self._checkpoint_has_teacher()
        return policy

    def datasets_provider(self, num_samples, vp_stage=None):
        """Megatron's data iterators only pace the loop (`--dataloader-type external`): RLP
        contexts are drawn from (seed, iteration) by this project's sampler."""
        return _Pacer(), None, None

    datasets_provider.is_distributed = True

    # --- the forward step --------------------------------------------------------------

    def forward_step(self, data_iterator, model):
        """One micro-batch: policy forward over prefix+thought, clipped-surrogate loss."""
        next(data_iterator)
        if self._calls % get_num_microbatches() == 0:
            self._rollout_and_score(model)
        batch = self._microbatches[self._calls % get_num_microbatches()]
        self._calls += 1
        r = self.cfg.rlp
        options = dict(logp_old_source=r.logp_old_source, tis_cap=r.tis_cap)
        eps = (r.clip_eps_low, r.clip_eps_high)
        # pretrain_rlp.py's forward step and loss, packed micro-batch or not. Every
        # micro-batch holds --micro-batch-size thought rows, so the scale is 1 as in
        # train/rlp_step.py (rlp_update.microbatch_scale).
        attention = self._attention if "branch" in batch else "mask"
        logits, loss = rlp_forward_step(1.0, self.tokenizer.vocab_size, r.temperature, eps,
                                        iter([batch]), model, attention=attention, **options)
        return logits, partial(self._loss_and_report, loss)

    def _loss_and_report(self, loss_fn, logits):
        loss, report = loss_fn(logits)
        self._losses.append(report)
        if len(self._losses) == get_num_microbatches():
            self._write_metrics()
        shown = {"rlp loss": report["loss"], "clip fraction": report["clip_fraction"],
                 "reward": torch.tensor(self._metrics["reward_mean"]),
                 "thought len": torch.tensor(self._metrics["thought_len"])}
        return loss, {k: v.detach().float().view(1) for k, v in shown.items()}

    def _rollout_and_score(self, model) -> None:
        """The RLP phases of train/rlp_step.py before the update, for iteration `step`."""
        state = self._train_state(model)
        self._apply_pending_update()
        cfg, tok, r = self.cfg, self.tokenizer, self.cfg.rlp
        step = int(getattr(self.args, "curr_iteration", 0)) + 1
        ro = rollout_and_score(state, self._sampler, step)
        prompts, thoughts, s_ema = ro.prompts, ro.thoughts, ro.s_ema
        rewards, advantages = ro.rewards, ro.advantages
        multiple = cfg.parallel.tensor_model_parallel_size if cfg.parallel.sequence_parallel else 1
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if update_layout(cfg, len(thoughts.tokens)) == "packed":
            # train/rlp_step.py's packed update: --micro-batch-size thought rows per
            # micro-batch as unpacked, so Megatron's micro-batch count is unchanged.
            self._microbatches = packed_microbatches(cfg, tok, ro, multiple, equal_width=pp > 1)
            self._attention = packed_attention(cfg)
            if pp > 1:  # Megatron's schedule sends --seq-length activations between stages
                self._microbatches = [_pad_packed_to(mb, self.args.seq_length, tok.pad)
                                      for mb in self._microbatches]
        else:
            batch = update_batch(prompts, thoughts, advantages, r.group_size, tok.pad,
                                 tok.think_start, multiple)
            if pp == 1:
                self._microbatches = trimmed_microbatches(batch, cfg.train.micro_batch_size,
                                                          multiple)
            else:  # Megatron's schedule sends --seq-length activations between stages
                batch = _pad_to(batch, self.args.seq_length, tok.pad)
                self._microbatches = split_microbatches(batch, cfg.train.micro_batch_size)
        if len(self._microbatches) != get_num_microbatches():
            raise ValueError(f"{len(self._microbatches)} RLP micro-batches but Megatron runs "
                             f"{get_num_microbatches()}: --global-batch-size must be contexts x "
                             f"--rlp-group-size")
        self._pending_update = True  # pretrain() steps the optimizer after these micro-batches
        g_rewards, g_adv = gather_data_parallel(rewards), gather_data_parallel(advantages)
        self._metrics = {
            "step": step,
            "reward_mean": float(g_rewards.mean()), "reward_std": float(g_rewards.std()),
            "advantage_std": float(g_adv.std()),
            "thought_len": float(gather_data_parallel(thoughts.lengths.float()).mean()),
            "closed_fraction": float(gather_data_parallel(thoughts.closed.float()).mean()),
            "s_ema": float(gather_data_parallel(s_ema).mean()),
            "s_pred": float(gather_data_parallel(thoughts.s_pred).mean()),
            "packed_update": "branch" in self._microbatches[0],  # plugin only: which update
        }
        self._losses = []

    # --- teacher ------------------------------------------------------------------------

    def _apply_pending_update(self) -> None:
        if self._pending_update:
            self.teacher.update(self.policy)  # phi <- tau*phi + (1-tau)*theta, after the step
            self._pending_update = False

    def teacher_in_checkpoint(self) -> bool:
        """Whether the policy's sharded state dict carries the teacher: always when saving (a
        never-initialised teacher is the policy itself), when loading only if the checkpoint
        has one."""
        if self._loading_teacher is not None:  # first call: Megatron's load, before training
            loading, self._loading_teacher = self._loading_teacher, None
            return loading
        self._apply_pending_update()
        if not self.teacher.initialized:
            self.teacher.initialize_from(self.policy)
        return True

    def _checkpoint_has_teacher(self) -> bool | None:
        """Looked up before Megatron's load: does `--load` hold `ema.` tensors? None without
        `--load` (the first sharded_state_dict call is then a save)."""
        from megatron_rlp.interop.megatron_lm import find

        load = getattr(self.args, "load", None)
        ckpt = find(load) if load and os.path.isdir(load) else None
        if ckpt is None:
            return None
        from megatron.core import dist_checkpointing

        keys = dist_checkpointing.load_tensors_metadata(str(ckpt)).keys()
        return any(k.startswith(_EMA) for k in keys)

    # --- bookkeeping -----------------------------------------------------------------

    def _train_state(self, model) -> TrainState:
        if self._state is None:
            d = self.cfg.data
            data = load_data(d.corpus, d.blend, d.split, self.tokenizer, self.cfg.train.seed,
                             d.cache_dir)
            self._state = TrainState(cfg=self.cfg, tokenizer=self.tokenizer, corpus=data.train,
                                     model_chunks=[model], policy=unwrap_model(model),
                                     optimizer=None, scheduler=None, teacher=self.teacher,
                                     device=torch_device(self.cfg))
            self._sampler = make_context_sampler(self._state)
        return self._state

    def _write_metrics(self) -> None:
        path = self.args.rlp_metrics_file
        if not path or torch.distributed.get_rank() != 0:
            return
        row = dict(self._metrics)
        for key in ("loss", "clip_fraction"):
            row[key] = float(torch.stack([d[key] for d in self._losses]).mean())
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


class _Pacer:
    """An endless iterator: one item per micro-batch, nothing in it."""

    def __iter__(self):
        return self

    def __next__(self):
        return None


def _pad_to(batch: dict, width: int, pad: int) -> dict:
    tokens = batch["tokens"]
    if tokens.shape[1] > width:
        raise ValueError(f"an RLP sequence of {tokens.shape[1]} tokens exceeds --seq-length "
                         f"{width}")
    out = dict(batch)
    out["tokens"] = torch.nn.functional.pad(tokens, (0, width - tokens.shape[1]), value=pad)
    out["positions"] = torch.arange(width).expand(tokens.shape[0], -1)
    return out


def _pad_packed_to(mb: dict, width: int, pad: int) -> dict:
    """A packed micro-batch right-padded to `width` columns (padding reads nothing: branch
    PAD, lo = hi = 0; see packing/tree.py)."""
    have = mb["tokens"].shape[1]
    if have > width:
        raise ValueError(f"a packed RLP sequence of {have} tokens exceeds --seq-length {width}")
    out = dict(mb)
    for key, value in (("tokens", pad), ("positions", 0), ("branch", PAD), ("lo", 0), ("hi", 0)):
        out[key] = torch.nn.functional.pad(mb[key], (0, width - have), value=value)
    return out
