"""The router losses of an MoE update, as Megatron tracks them, for the step's metrics.

Megatron's `TopKRouter` computes the load-balancing aux loss (`aux_loss`, `seq_aux_loss` or
`global_aux_loss`) and the z-loss in every training forward and attaches them to the
activations with `MoEAuxLossAutoScaler`: their gradients, at `moe_aux_loss_coeff` /
`moe_z_loss_coeff` and scaled by 1/micro-batches by Megatron's schedule, add to the RLP
surrogate's. The values (without the coefficients) go to Megatron's `MoEMetricsTracker`;
`router_losses` reads them with the tracker's own `report` (all-reduced over pipeline and
data-parallel ranks, averaged over MoE layers and micro-batches) and clears it.
"""

from __future__ import annotations

from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

# Megatron's tracker names, by `moe_router_load_balancing_type`.
AUX_LOSS_NAMES = {"aux_loss": "load_balancing_loss",
                  "seq_aux_loss": "seq_load_balancing_loss",
                  "global_aux_loss": "global_load_balancing_loss"}


def tracked_names(model_cfg) -> list[str]:
    """The tracker entries this model records in a training forward."""
    names = []
    if model_cfg.moe_aux_loss_coeff > 0 and model_cfg.moe_router_load_balancing_type in (
            AUX_LOSS_NAMES):
        names.append(AUX_LOSS_NAMES[model_cfg.moe_router_load_balancing_type])
    if model_cfg.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return names


def router_losses(cfg, num_microbatches: int, step: int) -> dict[str, float]:
    """`moe_<name>` for each router loss of the update just run (a collective over the
    pipeline and data-parallel groups: every rank calls it). Coefficient-free values, as
    Megatron-LM logs them; the loss the gradients follow adds coefficient x value."""
    names = tracked_names(cfg.model)
    if not names:
        return {}
    pattern = cfg.model.hybrid_layer_pattern.replace("|", "")
    totals: dict = {}
    get_moe_metrics_tracker().report(
        loss_scale=1.0 / max(num_microbatches, 1), iteration=step, total_loss_dict=totals,
        force_initialize=True, track_names=names, num_layers=len(pattern),
        moe_layer_freq=[int(c == "E") for c in pattern])
    return {f"moe_{k}": float(v) for k, v in totals.items()}
