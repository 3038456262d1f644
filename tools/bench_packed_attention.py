"""The packed update's core attention: FlexAttention (block-sparse) against the explicit mask.

    python tools/bench_packed_attention.py --out runs/bench/packed_attention.json \
        device.type=cuda precision.params_dtype=bf16
    python tools/bench_packed_attention.py --docs 1 --positions 2 --group 2 --window 64 \
        --thought 8 --repeats 1 --out /tmp/pa.json        # CPU plumbing check (tests)

One packed update (`packing.update.packed_update_batches`) over a synthetic batch: `--docs`
documents, `--positions` positions each spread over a `--window`-token window, `--group`
thoughts of `--thought` tokens per position (all full length: the worst case for masked
branch-to-branch tiles), laid out as `model.packed_attention=flex` lays them out (every
branch of a micro-batch behind one window copy; `--dense-layout`: the explicit mask's
choice, `packing.update.rows_per_sequence`). The config's model (default
examples/configs/tiny_cpu.yaml) runs forward + backward of every micro-batch with
`model.packed_attention` = mask, then flex, and the JSON holds:

- `sparsity`: per micro-batch mean, `block` = fraction of (query tile, key tile) FlexAttention
  skips at `--block-size`, `pair` = fraction of (query, key) pairs the tree mask masks;
- `seconds`: per path, the median over `--repeats` of one update (all micro-batches,
  forward + backward, synchronised), after one untimed pass (flex compiles there on CUDA);
- `speedup_flex_vs_mask`, and `loss_abs_diff` / `grad_max_abs_diff` between the paths
  (`grad_max_abs`: the mask path's largest gradient entry, their scale).

On CPU the flex path is FlexAttention's eager operator (dense math, for tests): its time
says nothing about the block-sparse kernel. Speed targets live here, not in tests.
tools/bench_rlp.py reports the same sparsity for its optimised path; tools/gpu_check.py runs
this as its `packed_attention` stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic_update(docs: int, positions: int, group: int, window: int, thought: int,
                     tok, device, seed: int = 0):
    """(windows, prompts, thoughts, advantages) of a packed update: `docs` random documents,
    `positions` targets spread over each `window`-token window, `group` full-length thoughts
    each. Log-probs are random (the ratio then clips some tokens, as in training)."""
    import numpy as np
    import torch

    from megatron_rlp.data.batches import build_rlp_inputs
    from megatron_rlp.data.contexts import Context
    from megatron_rlp.rollout.thoughts import ThoughtBatch

    rng = np.random.default_rng(seed)
    documents = [rng.integers(0, 256, size=window + 1).astype(np.int32) for _ in range(docs)]
    contexts = []
    for d, doc in enumerate(documents):
        for k in range(positions):  # t_k from window/positions up to the window's end
            t = window * (k + 1) // positions
            contexts.append(Context(d, t, doc[:t], int(doc[t])))
    prompts, windows = build_rlp_inputs(contexts, list(range(len(contexts))),
                                        SimpleNamespace(documents=documents), window, tok.pad,
                                        device)
    rows = len(contexts) * group
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (rows, thought), generator=gen)
    mask = torch.ones(rows, thought, dtype=torch.bool)
    logp = -torch.rand(rows, thought, generator=gen) * 3 - 2.5
    thoughts = ThoughtBatch(tokens=tokens.to(device), mask=mask.to(device),
                            logprobs=logp.to(device),
                            lengths=torch.full((rows,), thought, device=device),
                            closed=torch.ones(rows, dtype=torch.bool, device=device),
                            s_pred=torch.zeros(rows, device=device))
    return windows, prompts, thoughts, torch.randn(rows, generator=gen).to(device)


def sparsity_report(mbs: list[dict], block_size: int) -> dict[str, float]:
    """Mean block / pair sparsity (`packing.flex.packed_sparsity`) over packed micro-batches."""
    from megatron_rlp.packing.flex import packed_sparsity

    got = [packed_sparsity(mb["branch"], mb["lo"], mb["hi"], block_size) for mb in mbs]
    return {"block": statistics.fmean(g["block"] for g in got),
            "pair": statistics.fmean(g["pair"] for g in got), "block_size": block_size,
            "micro_batches": len(mbs), "width": int(mbs[0]["tokens"].shape[1])}


def available_bytes(device) -> int:
    """Free memory of `device`: CUDA's free bytes, or the host's MemAvailable."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def attention_bytes(mbs: list[dict], heads: int, element: int, timed: bool) -> int:
    """Bytes of the largest micro-batch's [m, S, S] tensors: the tree mask (bool, and its float
    copy for the pair sparsity) and, when timed, the explicit-mask path's scores, softmax and
    their gradient ([m, heads, S, S] each, `element` bytes)."""
    worst = max(int(mb["tokens"].shape[0]) * int(mb["tokens"].shape[1]) ** 2 for mb in mbs)
    return worst * (5 + (3 * heads * element if timed else 0))


def time_attention(model, mbs: list[dict], vocab_size: int, kinds=("mask", "flex"),
                   repeats: int = 3) -> dict:
    """Seconds of one packed update (forward + backward of every micro-batch) per attention
    path, the median of `repeats` after one untimed pass; the paths' loss and gradients."""
    import torch

    from megatron_rlp.train.rlp_update import rlp_forward_step

    cuda = next(model.parameters()).is_cuda

    def update(kind: str) -> float:
        model.zero_grad(set_to_none=True)
        total = 0.0
        for mb in mbs:
            logits, loss_fn = rlp_forward_step(1.0 / len(mbs), vocab_size, 0.7, (0.2, 0.2),
                                               iter([mb]), model, attention=kind)
            loss, _ = loss_fn(logits)
            loss.backward()
            total += float(loss.detach())
        return total

    out: dict = {"seconds": {}, "loss": {}}
    grads = {}
    for kind in kinds:
        out["loss"][kind] = update(kind)  # untimed: compiles flex on CUDA
        grads[kind] = [p.grad.detach().float().clone() for p in model.parameters()
                       if p.grad is not None]
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            update(kind)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out["seconds"][kind] = statistics.median(times)
    if set(kinds) == {"mask", "flex"}:
        out["speedup_flex_vs_mask"] = out["seconds"]["mask"] / out["seconds"]["flex"]
        out["loss_abs_diff"] = abs(out["loss"]["mask"] - out["loss"]["flex"])
        out["grad_max_abs_diff"] = max(float((a - b).abs().max())
                                       for a, b in zip(grads["mask"], grads["flex"], strict=True))
        out["grad_max_abs"] = max(float(a.abs().max()) for a in grads["mask"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--positions", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--thought", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-layout", action="store_true",
                        help="branches per window copy as chosen for the explicit mask "
                             "(packing.update.rows_per_sequence), not for FlexAttention")
    parser.add_argument("--sparsity-only", action="store_true",
                        help="report the block sparsity, time nothing (no model forward)")
    parser.add_argument("--out", default="runs/bench/packed_attention.json")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    if min(args.docs, args.positions, args.group, args.thought, args.repeats) < 1 \
            or args.window < args.positions:
        print("error: --docs/--positions/--group/--thought/--repeats must be >= 1 and "
              "--window >= --positions", file=sys.stderr)
        return 2

    from megatron_rlp.config import ConfigError
    from megatron_rlp.startup import load_config

    try:
        shape = (f"model.max_sequence_length={args.window + args.thought + 2}",
                 "rlp.min_prefix_tokens=1", f"rlp.max_prefix_tokens={args.window}",
                 f"rlp.max_thought_tokens={args.thought}")
        cfg = load_config(args.config, (*shape, *args.overrides), world_size=1)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import logging
    import warnings

    # As pretrain_rlp.py: Megatron's import-time notices about kernels a CPU run never uses
    # would precede a one-line refusal.
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch

    import megatron_rlp.train.loop  # noqa: F401  (Megatron imports before the CPU backend)
    from megatron_rlp import distributed
    from megatron_rlp.distributed import torch_device
    from megatron_rlp.models.provider import build_model
    from megatron_rlp.packing.update import packed_update_batches
    from megatron_rlp.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    distributed.initialize(cfg)
    try:
        device = torch_device(cfg)
        torch.manual_seed(cfg.train.seed)
        windows, prompts, thoughts, adv = synthetic_update(
            args.docs, args.positions, args.group, args.window, args.thought, tok, device)
        # One layout for both kernels: the cost model's for the block-sparse kernel (every
        # branch behind one window copy) unless --dense-layout (its choice for the mask).
        mbs = packed_update_batches(windows, prompts, thoughts, adv, args.group,
                                    cfg.train.micro_batch_size, tok.pad, tok.think_start,
                                    equal_width=False, model_cfg=cfg.model,
                                    block_sparse=not args.dense_layout)
        # Both paths hold [m, S, S] tensors: refused up front rather than killed for memory.
        need = attention_bytes(mbs, cfg.model.num_attention_heads, 4,  # fp32 softmax
                               not args.sparsity_only)
        free = available_bytes(device)
        if need > free:
            width = max(int(mb["tokens"].shape[1]) for mb in mbs)
            print(f"error: --window={args.window} needs ~{need / 2**30:.1f} GiB for the "
                  f"[sequences, S, S] masks{'' if args.sparsity_only else ' and scores'} of "
                  f"a micro-batch (S={width}), {device.type} has {free / 2**30:.1f} GiB free "
                  "(allowed: a smaller --window, --positions, --group or --thought)",
                  file=sys.stderr)
            return 2
        model = build_model(cfg, tok.vocab_size).to(device)
        res = {"sparsity": sparsity_report(mbs, args.block_size)}
        if not args.sparsity_only:
            res.update(time_attention(model, mbs, tok.vocab_size, repeats=args.repeats))
    finally:
        distributed.shutdown()
    res["run"] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "command": " ".join(sys.argv), **{k: getattr(args, k) for k in
                  ("docs", "positions", "group", "window", "thought", "block_size", "repeats")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    s = res["sparsity"]
    timing = "" if args.sparsity_only else (
        f" | mask {res['seconds']['mask']:.4f}s | flex {res['seconds']['flex']:.4f}s | "
        f"flex/mask speed-up {res['speedup_flex_vs_mask']:.2f}x | loss diff "
        f"{res['loss_abs_diff']:.2e}")
    print(f"[bench_packed_attention] {res['run']['device']}: block sparsity {s['block']:.3f} "
          f"(pair {s['pair']:.3f}, {s['micro_batches']} micro-batches of S={s['width']})"
          + timing, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
