"""What an update micro-batch keeps for backward, by layer kind and by the line that saved it:
a saved-tensor census of one `tools/simulate_gpu.py` run.

    python tools/simulated_census.py --config examples/configs/nemotron_nano_12b_v2.yaml \
        [section.key=value ...] [--top 30] [--mamba-kernels fused|torch]
    python tools/simulated_census.py --mamba-layer 16 80 1 128 2560 2049 [--mamba-kernels torch]

Runs `simulate_gpu.simulate` (the first stage, same options) with the autograd stand-in's
saved-tensor hooks (`simulated_autograd.PythonEngine.saved`) counting each tensor a node
keeps: its storage (counted once however many nodes or views keep it), the layer kind of
the module running when it was saved (Mamba, attention or MLP layer; anything else under
"other": embedding, output layer, loss) and the innermost file:line outside torch that asked
(`simulated_values.caller_site`). Parameters (and views of them) are left out: they are model
state. Only the update saves tensors (rollout and scoring run without grad), so the census
at its largest (just before a micro-batch's backward starts) is the update's kept
activations. Prints a table: per kind the GiB and the layers seen, then the largest sites.
`--mamba-layer HEADS HEADDIM GROUPS STATE WINDOW BRANCH` instead counts what one Mamba layer's
packed-update SSM (`models/mamba/branches.packed_ssm`, after `in_proj`) keeps, at a rank's
shapes (Nano 12B at TP8: 16 80 1 128; Nemotron-H 8B at TP4: 32 64 2 128), for one sequence of
a window and one branch, in bytes per token by line (`mamba_layer_census`).
Why a census and not `MemTracker`'s module snapshots: those refuse a module called more than
once (every decode step calls the model), see `simulate_gpu.PhaseMemTracker`.
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

GIB = 2**30
# Innermost module class name -> layer kind (Megatron's hybrid stack: `M` MambaLayer, `*` a
# TransformerLayer with self-attention only, `-` one with an MLP only).
KINDS = (("MambaLayer", "mamba"), ("SelfAttention", "attention"), ("MLP", "mlp"))


class Census:
    """Counts live saved storages by (kind, site); `best` is the largest state seen."""

    def __init__(self):
        self.stack: list = []  # modules whose forward is running
        self.refs: collections.Counter = collections.Counter()  # storage -> live holders
        self.info: dict = {}  # storage -> (bytes, kind, site, example)
        self.layers: dict[str, set] = collections.defaultdict(set)
        self.live = 0
        self.growing = False
        self.best: tuple[int, dict] = (0, {})

    def kind(self) -> tuple[str, int | None]:
        for module in reversed(self.stack):
            name = type(module).__name__
            for cls, kind in KINDS:
                if cls in name:
                    return kind, id(module)
        return "other", None

    def pack(self, t: torch.Tensor, holder: list) -> None:
        base = t if t._base is None else t._base
        if base.is_leaf and base.requires_grad:  # a parameter (or a view of one)
            return
        key = t.untyped_storage()._cdata
        if self.refs[key] == 0:
            from simulated_values import caller_site

            kind, layer = self.kind()
            if layer is not None:
                self.layers[kind].add(layer)
            nbytes = t.untyped_storage().nbytes()
            example = f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
            self.info[key] = (nbytes, kind, caller_site(), example)
            self.live += nbytes
        self.refs[key] += 1
        holder.append(key)
        self.growing = True

    def release(self, key) -> None:
        if self.growing:  # a backward begins: the forward's saved set is complete
            self.growing = False
            if self.live > self.best[0]:
                self.best = (self.live, self.snapshot())
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.info.pop(key)[0]
            del self.refs[key]

    def snapshot(self) -> dict:
        table: dict = collections.defaultdict(lambda: [0, 0, ""])
        for key in self.refs:
            nbytes, kind, site, example = self.info[key]
            row = table[(kind, site)]
            row[0] += nbytes
            row[1] += 1
            row[2] = row[2] or example
        return dict(table)


def install(census: Census, stack) -> None:
    """Module hooks that keep `census.stack`, and `PythonEngine.saved` hooks that count."""
    import simulated_autograd

    def enter(module, args):
        census.stack.append(module)

    def leave(module, args, out):  # returns None: the output is left as it is
        if census.stack and census.stack[-1] is module:
            census.stack.pop()

    pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    post = torch.nn.modules.module.register_module_forward_hook(leave)
    stack.callback(pre.remove)
    stack.callback(post.remove)

    class Holder(list):
        """The engine's holder (`[tensor]`); `clear()` (the node ran) releases its count."""

        def clear(self):
            for key in self[1:]:
                census.release(key)
            super().clear()

    def saved(engine):
        def pack(t):
            holder = Holder([t])
            census.pack(t, holder)
            return holder

        def unpack(holder):
            if not holder:
                raise RuntimeError("a saved tensor was used after its node ran (retain_graph?)")
            if engine._unpacked is not None:
                engine._unpacked.append(holder)
            return holder[0]

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    stack.enter_context(mock.patch.object(simulated_autograd.PythonEngine, "saved", saved))


def report(census: Census, top: int) -> str:
    total, table = census.best
    lines = [f"kept for backward at the update's largest: {total / GIB:.2f} GiB"]
    by_kind: collections.Counter = collections.Counter()
    for (kind, _), (nbytes, _, _) in table.items():
        by_kind[kind] += nbytes
    for kind, nbytes in by_kind.most_common():
        layers = len(census.layers.get(kind, ())) or "-"
        lines.append(f"  {kind:<10}{nbytes / GIB:9.2f} GiB  layers {layers}")
    lines.append("largest sites (GiB, storages, an example):")
    for (kind, site), (nbytes, count, example) in sorted(table.items(),
                                                         key=lambda kv: -kv[1][0])[:top]:
        short = site.split("/site-packages/")[-1].split("/megatron_rlp/")[-1]
        lines.append(f"  {nbytes / GIB:8.2f} {count:6d}  {kind:<10}{short:<48}{example}")
    return "\n".join(lines)


def mamba_layer_census(heads: int, headdim: int, groups: int, state: int, window: int,
                       branch: int, kernels: str = "fused") -> tuple[int, dict]:
    """(bytes kept, {file:line: (bytes, an example)}) by `packed_ssm` of one layer with the
    given per-rank shapes on fake CUDA, over one sequence of `window` + `branch` tokens
    (Megatron's chunk 128, bf16 conv weights, fp32 A, D, dt bias); each saved storage once,
    while its node lives. Runs its backward too (a check that it does)."""
    import contextlib
    import weakref
    from types import SimpleNamespace

    import simulated_mamba
    from megatron.core.ssm import mamba_mixer as mm
    from simulated_autograd import PythonEngine
    from simulated_cuda import simulated_cuda
    from simulated_values import HostValues, Oracle, caller_site
    from torch._subclasses.fake_tensor import FakeTensorMode

    from megatron_rlp.models.mamba import adapter, branches

    adapter.select_kernels()
    di, s = heads * headdim, window + branch
    cd = di + 2 * groups * state
    fused = simulated_mamba.fused_mamba_kernels() if kernels == "fused" \
        else contextlib.nullcontext()
    holders: list = []

    class Holder(list):
        site = ""

    def pack(t):
        holder = Holder([t])
        holder.site = caller_site()
        base = t if t._base is None else t._base
        if not (base.is_leaf and base.requires_grad):
            holders.append(weakref.ref(holder))
        return holder

    with fused, simulated_cuda(80.0), mock.patch.object(
            torch.autograd.Variable, "_execution_engine", PythonEngine()), \
            FakeTensorMode(allow_non_fake_inputs=True), HostValues(Oracle()):
        def param(*shape, dtype=torch.float32):
            return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)

        p = {"D": param(heads), "A_log": param(heads), "dt_bias": param(heads),
             "w": param(cd, 1, 4, dtype=torch.bfloat16), "b": param(cd, dtype=torch.bfloat16)}
        cp = SimpleNamespace(
            cp_size=1, d_inner_local_tpcp=di, ngroups_local_tpcp=groups, nheads_local_tpcp=heads,
            get_D=lambda: p["D"], get_A_log=lambda: p["A_log"], get_dt_bias=lambda: p["dt_bias"],
            get_conv1d_weight=lambda: p["w"], get_conv1d_bias=lambda: p["b"])
        norm = mm.ExtendedRMSNorm(di, eps=1e-5, group_size=di // groups, norm_before_gate=False,
                                  device="cuda", dtype=torch.bfloat16)
        mixer = SimpleNamespace(cp=cp, D_has_hdim=False, headdim=headdim, d_state=state,
                                chunk_size=128, activation="silu", rmsnorm=True, norm=norm)
        kind = torch.full((1, s), -1, dtype=torch.long)
        kind[0, window:] = 0
        ends = torch.zeros(1, s, dtype=torch.long)
        ends[0, window:] = window
        layout = branches.BranchLayout.from_packed(kind.to("cuda"), ends.to("cuda"))
        zx = param(s, 1, 2 * di + 2 * groups * state + heads, dtype=torch.bfloat16)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder[0]):
            y = branches.packed_ssm(mixer, zx, layout)
        kept: dict = {}
        for ref in holders:
            holder = ref()
            if holder is not None:
                t = holder[0]
                kept.setdefault(t.untyped_storage()._cdata, (
                    t.untyped_storage().nbytes(), holder.site,
                    f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"))
        y.float().sum().backward()
    by_site: dict = {}
    for nbytes, site, example in kept.values():
        total, first = by_site.get(site, (0, example))
        by_site[site] = (total + nbytes, first)
    return sum(v[0] for v in by_site.values()), by_site


def main(argv: list[str] | None = None) -> int:
    import contextlib

    import simulate_gpu

    from megatron_rlp.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--mamba-layer", type=int, nargs=6, default=None,
                        metavar=("HEADS", "HEADDIM", "GROUPS", "STATE", "WINDOW", "BRANCH"))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--mamba-kernels", choices=("fused", "torch"), default="fused",
                        help="torch: the package's plain-torch Mamba ops (models/mamba/ops.py)")
    parser.add_argument("--decode-steps", type=int, default=2)
    parser.add_argument("--update-microbatches", type=int, default=1)
    args = parser.parse_intermixed_args(argv)
    warnings.filterwarnings("ignore")
    if args.mamba_layer:
        total, by_site = mamba_layer_census(*args.mamba_layer, kernels=args.mamba_kernels)
        tokens = args.mamba_layer[4] + args.mamba_layer[5]
        print(f"packed_ssm ({args.mamba_kernels}): {total / 2**20:.1f} MiB kept, "
              f"{total / tokens:.0f} bytes a token")
        for site, (nbytes, example) in sorted(by_site.items(), key=lambda kv: -kv[1][0]):
            short = site.split("/site-packages/")[-1].split("/megatron_rlp/")[-1]
            print(f"  {nbytes / tokens:9.0f}  {short:<48}{example}")
        return 0
    if not args.config:
        parser.error("--config is required (or --mamba-layer)")
    forced = ("device.type=cuda", "model.packed_attention=split")
    cfg = load_config(args.config, (*args.overrides, *forced))
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        corpus = simulate_gpu.long_document_corpus(cfg, Path(scratch) / "docs.jsonl")
        world = args.world_size or simulate_gpu.default_world_size(cfg)
        cfg = load_config(args.config, (*args.overrides, *forced, f"data.corpus={corpus}"),
                          world_size=world)
        census = Census()
        with contextlib.ExitStack() as stack:
            install(census, stack)
            out = simulate_gpu.simulate(cfg, world, ["first"],
                                        decode_steps=args.decode_steps,
                                        update_microbatches=args.update_microbatches,
                                        mamba_kernels=args.mamba_kernels)
    r = out["ranks"][0]
    print(f"{cfg.model.name}: simulated update peak {r['peak_gib_by_phase'].get('update')} GiB "
          f"(model state {r['model_state_gib']} GiB)")
    print(report(census, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
