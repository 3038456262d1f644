"""One MoE layer of a recipe at full size on simulated CUDA: the bytes it keeps per token.

    python tools/simulate_moe_layer.py --config examples/configs/qwen3_30b_a3b.yaml \
        [--tokens 4608] [--moe-routing even|worst] [--world-size 64]

Builds the recipe's Megatron `MoELayer` (local spec: router, all-to-all dispatcher, this
rank's `SequentialMLP` experts, the shared expert) on fake CUDA over a fake process group of
the recipe's layout, as `tools/simulate_gpu.py` builds the whole model, and runs it on
`--tokens` tokens (one update sequence) under the MoE rules of `tools/simulated_moe.py`:
- with grad: the bytes its autograd graph keeps for backward once the forward has run
  (the tracker's growth, less the output), per token;
- without grad (the rollout's and the teacher's forward): its peak above its input, per token.
Both beside the memory estimate's terms (`train/memory.py` `moe_bytes`, which also counts
the pre-MLP norm's input and output, and `moe_transient_bytes`). The full step
(`simulate_gpu.py`) gives only the update's total; this isolates the MoE layer's share,
which is what the estimate's MoE terms are checked against (tests/tools/test_simulated_moe.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from megatron_rlp.config import RunConfig, load_config  # noqa: E402


def measure(cfg: RunConfig, world_size: int, tokens: int, routing: str = "even") -> dict:
    """Bytes per token one MoE layer of `cfg` keeps (with grad) and peaks at (no grad), on
    rank 0 of `world_size` (module docstring); with the estimate's terms beside them."""
    import torch.distributed as dist
    from megatron.core import tensor_parallel
    from simulated_autograd import PythonEngine
    from simulated_cuda import initialize_model_parallel, simulated_cuda
    from simulated_moe import collective_values, routing_rule
    from simulated_values import HostValues, Oracle
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_rlp.models.local_spec import LocalNorm
    from megatron_rlp.models.moe import local_moe_layer_spec
    from megatron_rlp.models.provider import transformer_config
    from megatron_rlp.train import memory

    p = cfg.parallel
    peaks: list[int] = []

    class Tracker(MemTracker):  # totals after each op; no per-module snapshots (run twice)
        def _update_peak_stats(self, peak_state):
            super()._update_peak_stats(peak_state)
            peaks.append(current())

        def _pre_fw_hook(self, *args):
            pass

        _post_fw_hook = _pre_bw_hook = _post_bw_hook = _pre_fw_hook

    tracker = Tracker()

    def current() -> int:
        snap = tracker._curr_mem_snap
        return sum(v.get("Total", 0) for d, v in snap.items() if d.type == "cuda")

    with contextlib.ExitStack() as stack:
        stack.enter_context(simulated_cuda(80.0))
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
        stack.callback(dist.destroy_process_group)
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        values = stack.enter_context(HostValues(Oracle()))
        values.collectives = collective_values
        stack.enter_context(routing_rule(values, routing))
        initialize_model_parallel(p, stack)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
        config = transformer_config(cfg)
        with torch.device("cuda"):
            layer = local_moe_layer_spec(LocalNorm).submodules.mlp(config=config)
        layer.train()
        engine = PythonEngine([])
        stack.enter_context(mock.patch.object(
            torch.autograd.Variable, "_execution_engine", engine))
        stack.enter_context(engine.saved())
        tracker.track_external(layer)  # its parameters exist before the forward
        stack.enter_context(tracker)
        h = config.hidden_size
        x = torch.randn(tokens, 1, h, device="cuda", dtype=config.params_dtype,
                        requires_grad=True)
        out_bytes = x.numel() * x.element_size()
        before = current()
        out, _ = layer(x)
        kept = current() - before - out_bytes
        del out
        base = current()
        peaks.clear()
        with torch.no_grad():
            layer(x)
        transient = max(peaks, default=base) - base
    s = memory.shapes(cfg, 0)
    tp, b = p.tensor_model_parallel_size, torch.finfo(config.params_dtype).bits // 8
    norm = 2 * b * s.hidden  # the pre-MLP norm's input and output, in `moe_bytes`
    return {"config": cfg.model.name, "tokens": tokens, "routing": routing,
            "kept_bytes_per_token": kept / tokens + norm,
            "moe_bytes": memory.moe_bytes(s, tp, b),
            "no_grad_peak_bytes_per_token": transient / tokens + norm,
            "moe_transient_bytes": memory.moe_transient_bytes(s, tp, b)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--world-size", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4608)
    parser.add_argument("--moe-routing", choices=("even", "worst"), default="even")
    args = parser.parse_intermixed_args(argv)
    warnings.filterwarnings("ignore")
    cfg = load_config(args.config, (*args.overrides, "device.type=cuda"),
                      world_size=args.world_size)
    print(json.dumps(measure(cfg, args.world_size, args.tokens, args.moe_routing), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
