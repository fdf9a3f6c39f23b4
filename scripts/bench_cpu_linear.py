"""oneDNN-packed Linears (vexport/backends/cpu_linear.py) against plain ``F.linear`` on the CPU, side by side.

Times one pass over the decoder Linears of a model config (default: SmolLM2-135M's shapes, 30 layers x q, k, v,
o, gate, up, down, random float32 weights) at several row counts, both kernels interleaved, and prints the
fastest of the runs and the ratio. Also checks that the outputs agree.

    python scripts/bench_cpu_linear.py [--rows 1 4 64 1024] [--threads 2] [--runs 5]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from vexport.backends.cpu_linear import PackedLinear, available

# (out, in) of one SmolLM2-135M decoder layer: q, k, v, o, gate, up, down
LAYER = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 64, 1024])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not available():
        raise SystemExit("this torch build has no oneDNN (mkldnn)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain = [nn.Linear(k, n, bias=False) for _ in range(args.layers) for n, k in LAYER]
    packed = [PackedLinear(linear) for linear in plain]
    print(f"{len(plain)} Linears, {args.threads} threads, fastest of {args.runs} runs")
    print("| rows | F.linear (MKL) | oneDNN packed | ratio | max abs diff |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for rows in args.rows:
            inputs = {k: torch.randn(rows, k) for k in {k for _, k in LAYER}}
            best = {"plain": float("inf"), "packed": float("inf")}
            for _ in range(args.runs + 1):  # the first run of each is a warm-up
                for name, mods in (("plain", plain), ("packed", packed)):
                    start = time.perf_counter()
                    for mod in mods:
                        mod(inputs[mod.in_features])
                    best[name] = min(best[name], time.perf_counter() - start) if _ else best[name]
            diff = max(float((p(inputs[p.in_features]) - F.linear(inputs[p.in_features], q.weight)).abs().max())
                       for p, q in zip(packed[:7], plain[:7]))
            print(f"| {rows} | {best['plain'] * 1e3:.1f} ms | {best['packed'] * 1e3:.1f} ms | "
                  f"{best['plain'] / best['packed']:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
