"""The matmul paths of models/llama.py's Linear, timed against each other on one model's weight shapes.

    python -m benchmarks.linear_kernels --dtype bfloat16 --rows 1 4 16 64 256 2048
    python -m benchmarks.linear_kernels --dtype float32 --rows 64 --rounds 9

For each weight shape of SmolLM2-135M (fused q/k/v, o, fused gate/up, down) it makes `--layers` distinct
random weights, as many as the model has, so that a step's weights stream from memory as in the engine,
and times every path this CPU has at each row count: `panels` (csrc/panel_linear.cpp), `onednn` (oneDNN's
packed matmul, where it runs the dtype) and `torch` (F.linear on the plain weight). The paths alternate
round by round, so that the VM's drift hits all of them alike; it prints each path's best and median
GF/s summed over the four shapes, as JSON lines, one per row count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

# SmolLM2-135M: hidden 576, 9 heads and 3 KV heads of 64, intermediate 1,536 (N, K of each weight)
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def paths(dtype: torch.dtype, weights: list[torch.Tensor]) -> dict:
    """name -> fn(x, i) running the i-th weight's matmul, for each path this CPU has."""
    from services.engine.cpu_kernels import load_panel_linear_module
    from services.engine.models.llama import onednn_packs

    out = {"torch": lambda x, i: F.linear(x, weights[i])}
    panel = load_panel_linear_module()
    if panel is not None and panel.available:
        panels = [panel.pack_panels(w) for w in weights]
        out["panels"] = lambda x, i: panel.panel_linear(x, panels[i], weights[i].shape[0])
    if onednn_packs(dtype):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in weights]
        out["onednn"] = lambda x, i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256, 2048])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    weights, flops_per_row = [], 0
    for n, k in SHAPES.values():
        weights += [(torch.randn(n, k, generator=gen) / k**0.5).to(dtype) for _ in range(args.layers)]
        flops_per_row += 2 * n * k * args.layers
    fns = paths(dtype, weights)
    for rows in args.rows:
        xs = {k: torch.randn(rows, k, generator=gen).to(dtype) for k in {w.shape[1] for w in weights}}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                t = time.perf_counter()
                for i, w in enumerate(weights):
                    fn(xs[w.shape[1]], i)
                times[name].append(time.perf_counter() - t)
        flops = flops_per_row * rows
        print(json.dumps({"dtype": args.dtype, "rows": rows}
                         | {f"{name}_gfs": [round(flops / min(t) / 1e9), round(flops / statistics.median(t) / 1e9)] for name, t in times.items()}))  # fmt: skip


if __name__ == "__main__":
    main()
