"""The parallel layout (TP, PP, DP, VP, EP sizes) a checkpoint is written in, as saved in its
common state and printed in messages.

Megatron functions used: `megatron.core.parallel_state.get_*_world_size`.
"""

from __future__ import annotations

from megatron.core import parallel_state


def current_layout() -> dict[str, int]:
    """This run's layout: {"tp", "pp", "dp"} sizes, "vp" with an interleaved pipeline, "ep"
    with expert parallelism."""
    layout = {"tp": parallel_state.get_tensor_model_parallel_world_size(),
              "pp": parallel_state.get_pipeline_model_parallel_world_size(),
              "dp": parallel_state.get_data_parallel_world_size()}
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vp:
        layout["vp"] = vp
    ep = parallel_state.get_expert_model_parallel_world_size()
    if ep > 1:  # MoE experts split over ranks (absent at EP=1: older layouts compare equal)
        layout["ep"] = ep
    return layout


def fmt_layout(layout: dict | None) -> str:
    """"TP=2 PP=1 DP=1" for messages; "unknown" for a checkpoint without one."""
    return " ".join(f"{k.upper()}={v}" for k, v in (layout or {}).items()) or "unknown"
