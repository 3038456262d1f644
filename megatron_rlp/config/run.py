"""`RunConfig`: the run's sections and the pure rules across them (parallel sizes against
the model, batch shapes against the world size, sequence lengths against
`model.max_sequence_length`). The rules that need the machine (Transformer Engine, CUDA
capability, FlexAttention) are `megatron_rlp.startup.check_machine`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_rlp.config.errors import check
from megatron_rlp.config.model import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_rlp.config.rlp import RLPConfig, template_token_count
from megatron_rlp.config.sections import DataConfig, DeviceConfig, OptimizerConfig, TrainConfig


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rlp: RLPConfig = field(default_factory=RLPConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

    def validate(self, world_size: int | None = None) -> RunConfig:
        """Check every section, then the cross-section rules; return self.

        Raises:
            ConfigError: the first bad value (one line naming it). The rules that need the
                machine are `megatron_rlp.startup.check_machine`.
        """
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        p, m = self.parallel, self.model
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        check(m.num_query_groups % tp == 0, "parallel.tensor_model_parallel_size", tp,
              f"a divisor of model.num_query_groups={m.num_query_groups}")
        check(m.ffn_hidden_size % tp == 0, "parallel.tensor_model_parallel_size", tp,
              f"a divisor of model.ffn_hidden_size={m.ffn_hidden_size}")
        if "M" in m.hybrid_layer_pattern:
            heads, groups = m.mamba_heads(), m.mamba_num_groups
            check(heads % tp == 0 and groups % tp == 0, "parallel.tensor_model_parallel_size",
                  tp, f"a divisor of the {heads} Mamba heads and mamba_num_groups={groups}")
        check(m.make_vocab_size_divisible_by % tp == 0, "parallel.tensor_model_parallel_size",
              tp, f"a divisor of model.make_vocab_size_divisible_by="
              f"{m.make_vocab_size_divisible_by} (the padded vocabulary is split over TP)")
        self._check_moe()
        if world_size is not None:
            self._check_run_shapes(world_size)
        check(self.train.eval_interval == 0 or self.data.split_weights()[1] > 0,
              "train.eval_interval", self.train.eval_interval,
              f"0 unless data.split holds out a valid split (data.split={self.data.split!r}, "
              f"e.g. 98,2,0)")
        stages = m.hybrid_layer_pattern.count("|") + 1
        vp = p.virtual_pipeline_model_parallel_size
        # train/ntp_mix.py runs the NTP term as one micro-batch; an interleaved schedule
        # needs a multiple of PP micro-batches.
        check(vp is None or self.rlp.ntp_loss_coef == 0, "rlp.ntp_loss_coef",
              self.rlp.ntp_loss_coef, "0 with parallel.virtual_pipeline_model_parallel_size set")
        if vp is None:
            check(stages == 1 or stages == pp, "model.hybrid_layer_pattern",
                  m.hybrid_layer_pattern,
                  f"{pp} pipeline stage(s) (| separated) for pipeline_model_parallel_size={pp}")
            layers = sum(c in "M*-" for c in m.hybrid_layer_pattern)
            if stages == 1 and layers % pp:  # Megatron splits a `|`-free pattern evenly
                body = m.hybrid_layer_pattern
                cut = [body[i * len(body) // pp:(i + 1) * len(body) // pp] for i in range(pp)]
                check(False, "model.hybrid_layer_pattern", m.hybrid_layer_pattern,
                      f"| between {pp} non-empty stages, e.g. {'|'.join(cut)!r}, or a layer "
                      f"count divisible by pipeline_model_parallel_size={pp}, split evenly "
                      f"({layers} layers here; Megatron deprecates patterns without | under "
                      "PP)")
        else:
            check(stages == pp * vp, "model.hybrid_layer_pattern", m.hybrid_layer_pattern,
                  f"{pp * vp} | separated chunks (pipeline_model_parallel_size={pp} x "
                  f"virtual_pipeline_model_parallel_size={vp}), each with at least one layer")
            check(all(seg for seg in m.hybrid_layer_pattern.split("|")),
                  "model.hybrid_layer_pattern", m.hybrid_layer_pattern,
                  "no empty chunk between | separators")
        if vp is None:
            check(stages == 1 or all(seg for seg in m.hybrid_layer_pattern.split("|")),
                  "model.hybrid_layer_pattern", m.hybrid_layer_pattern,
                  "no empty pipeline stage between | separators")
        # FlexAttention serves only the branch-packed update, which shares prefixes.
        check(m.packed_attention != "flex" or self.rlp.share_prefixes, "model.packed_attention",
              m.packed_attention, "auto or mask with rlp.share_prefixes=false (flex serves only "
              "the branch-packed update, which shares prefixes; set rlp.share_prefixes=true "
              "to use it)")
        self._check_sequence_lengths()
        return self

    def _check_moe(self) -> None:
        """MoE against the layout and the objective (the world size is `_check_run_shapes`)."""
        m, p = self.model, self.parallel
        ep, tp = p.expert_model_parallel_size, p.tensor_model_parallel_size
        if "E" not in m.hybrid_layer_pattern:
            check(ep == 1, "parallel.expert_model_parallel_size", ep,
                  "1 without E (MoE) layers in model.hybrid_layer_pattern")
            return
        check(m.num_experts % ep == 0, "parallel.expert_model_parallel_size", ep,
              f"a divisor of model.num_experts={m.num_experts}")
        for key in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            v = getattr(m, key)
            check(v is None or v % tp == 0, "parallel.tensor_model_parallel_size", tp,
                  f"a divisor of model.{key}={v}")
        # Megatron's MoELayer raises in training with TP > 1 and no sequence parallel.
        check(tp == 1 or p.sequence_parallel, "parallel.sequence_parallel", p.sequence_parallel,
              "true with E (MoE) layers and tensor_model_parallel_size > 1 (Megatron's MoELayer)")
        # Token dropping makes a token's experts depend on the other tokens of its batch:
        # rollout (decode, one token a step) and update (whole sequences) would route apart.
        check(m.moe_expert_capacity_factor is None or self.train.objective != "rlp",
              "model.moe_expert_capacity_factor", m.moe_expert_capacity_factor,
              "null with train.objective=rlp (exact on-policy routing: no token dropping)")

    def _check_run_shapes(self, world_size: int) -> None:
        """The run-time constraints that depend on the world size, checked here so that a
        run never stops at step 1 over them. Each names the code that would fail:

        - TP x PP divides the world; DP = world / (TP x PP) divides the global batches
          (`rlp_step.local_contexts`, `ntp_step`, `validate.validate` slice them evenly);
        - `train.micro_batch_size` divides the sequences of a rank (`batches.split_microbatches`),
          and under an interleaved pipeline gives a multiple of PP micro-batches (Megatron's
          `forward_backward_pipelining_with_interleaving` asserts it);
        - a document's contexts stay on one rank (`data/batches.py` rebuilds their shared
          window from the contexts a rank holds, starting max_prefix_tokens before the first
          position; split, the prefixes would depend on DP).
        """
        p, r, t = self.parallel, self.rlp, self.train
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        # Name the factor that breaks the division (PP when TP alone divides the world).
        pp_breaks = isinstance(world_size, int) and world_size % tp == 0 and pp > 1
        key, value, other = (("parallel.pipeline_model_parallel_size", pp,
                              f"tensor_model_parallel_size={tp}") if pp_breaks else
                             ("parallel.tensor_model_parallel_size", tp,
                              f"pipeline_model_parallel_size={pp}"))
        check(isinstance(world_size, int) and world_size >= 1 and world_size % (tp * pp) == 0,
              key, value, f"TP*PP dividing the world size {world_size} ({other})")
        dp = world_size // (tp * pp)
        ep = p.expert_model_parallel_size
        check(dp % ep == 0, "parallel.expert_model_parallel_size", ep,
              f"EP*TP*PP dividing the world size {world_size} (EP a divisor of the "
              f"data-parallel size {dp}; tensor_model_parallel_size={tp}, "
              f"pipeline_model_parallel_size={pp})")
        # Each batch size only where its objective reads it (an RLP run never builds an NTP
        # batch, nor an NTP run RLP contexts).
        if t.objective == "rlp":
            check(r.contexts_per_step % dp == 0, "rlp.contexts_per_step", r.contexts_per_step,
                  f"a multiple of the data-parallel size {dp}")
        else:
            check(self.data.ntp_batch_size % dp == 0, "data.ntp_batch_size",
                  self.data.ntp_batch_size, f"a multiple of the data-parallel size {dp}")
        check(t.eval_interval == 0 or t.eval_contexts % dp == 0, "train.eval_contexts",
              t.eval_contexts, f"a multiple of the data-parallel size {dp}")
        local = r.contexts_per_step // dp
        if t.objective == "rlp":
            check(local % r.positions_per_document == 0, "rlp.positions_per_document",
                  r.positions_per_document,
                  f"a divisor of the {local} contexts per data-parallel rank (contexts_per_step"
                  f"={r.contexts_per_step} / DP={dp}): one document's contexts share a window "
                  "and stay on one rank")
            # Rollout chunks need no check: a chunk of more contexts than a rank holds is one
            # chunk of all of them (thoughts.sample_thoughts_chunked), so a chunk size set for
            # a small job stays valid when the job grows; keyed sampling makes the thoughts
            # independent of the chunking.
            sequences, what = local * r.group_size, (
                f"{local} contexts x group_size={r.group_size} thoughts")
        else:
            sequences = self.data.ntp_batch_size // dp
            what = f"data.ntp_batch_size={self.data.ntp_batch_size} / DP={dp}"
        mbs = t.micro_batch_size
        check(sequences % (mbs or sequences) == 0, "train.micro_batch_size", mbs,
              f"0 or a divisor of the {sequences} sequences per data-parallel rank ({what})")
        if p.virtual_pipeline_model_parallel_size is not None:
            count = sequences // (mbs or sequences)
            check(count % pp == 0, "train.micro_batch_size", mbs,
                  f"a size giving a multiple of pipeline_model_parallel_size={pp} micro-batches "
                  f"(interleaved pipeline; {sequences} sequences per data-parallel rank)")

    def _check_sequence_lengths(self) -> None:
        """The longest sequence a run builds fits `model.max_sequence_length`: a rollout is
        prefix + `<think>` + thought (`</think>` included) + the `</think>` a cut-off thought
        is given (`rollout/thoughts.py` sizes its KV cache so); NTP windows are
        `data.ntp_seq_length` long. Evaluation samples thoughts in NTP runs too."""
        m, r = self.model, self.rlp
        extra, extra_what = 0, ""
        if r.thought_template != "none":  # the template's instruction and forced tokens
            extra = template_token_count(r.thought_template, self.data.tokenizer)
            extra_what = f" + {extra} rlp.thought_template tokens"
        needs = []
        if self.train.objective == "rlp" and r.positions_per_document > 1:
            # Contexts of one document share a window longer than max_prefix_tokens (issue 11):
            # the last position's prefix spans it.
            needs.append((r.max_window_tokens() + r.max_thought_tokens + 2 + extra,
                          f"the longest document window, {r.max_window_tokens()} tokens with "
                          f"rlp.positions_per_document={r.positions_per_document}, + <think> + "
                          "rlp.max_thought_tokens + </think>" + extra_what))
        if self.train.objective == "rlp" or self.train.eval_interval:
            # Evaluation draws one position per document: windows of max_prefix_tokens.
            needs.append((r.max_prefix_tokens + r.max_thought_tokens + 2 + extra,
                          "rlp.max_prefix_tokens + <think> + rlp.max_thought_tokens + </think>"
                          + extra_what))
        if self.train.objective == "ntp":
            needs.append((self.data.ntp_seq_length, "data.ntp_seq_length"))
        for need, what in needs:
            check(m.max_sequence_length >= need, "model.max_sequence_length",
                  m.max_sequence_length, f">= {need} ({what})")
        p = self.parallel
        if self.train.objective == "ntp" and p.sequence_parallel:
            # The NTP update feeds whole windows; sequence parallel splits them over TP.
            check(self.data.ntp_seq_length % p.tensor_model_parallel_size == 0,
                  "data.ntp_seq_length", self.data.ntp_seq_length,
                  f"a multiple of tensor_model_parallel_size={p.tensor_model_parallel_size} "
                  "with parallel.sequence_parallel=true")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cascade_decode(cfg: RunConfig) -> bool:
    """`rlp.cascade_decode`, with None (auto) resolved: on for device.type=cuda."""
    if cfg.rlp.cascade_decode is not None:
        return bool(cfg.rlp.cascade_decode)
    return cfg.device.type == "cuda"
