"""The fused int4 GPTQ matmul (``vexport.kernels.int4_matmul``) against fp16 ``F.linear`` (cuBLAS), one run.

On a CUDA GPU, for the 13B Linear shapes (5120->5120, 5120->13824, 13824->5120; group 128, act-order) at 1, 16,
256 and 4096 tokens, measured side by side: the Triton kernel, ``F.linear`` on the fp16 weight (the
dequantized int4 weight, so both multiply the same numbers), and ``QuantLinear`` as vexport ships it (the
Triton kernel up to ``vexport.backends.gptq.TRITON_MAX_TOKENS`` = 64 rows, dequantize + cuBLAS above), with
the kernel's int4 weight bandwidth and its error against the dequantized fp16 matmul (kernel error only:
quantization error never enters, both sides use the same dequantized weight).

``--smoke`` (and any run without a GPU, under the Triton interpreter): tiny odd shapes checked against the
same references; no timings.

    python scripts/bench_int4_matmul.py [--tokens 1 16 256 4096] [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

log = logging.getLogger("bench_int4_matmul")
SHAPES_13B = [(5120, 5120), (5120, 13824), (13824, 5120)]  # (in_features, out_features)
SMOKE_SHAPES = [(136, 64), (64, 40)]
GROUP_SIZE = 128


def gptq_tensors(in_f: int, out_f: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    """Random GPTQ v1 tensors (full 0..15 codes and zeros, positive scales, act-order g_idx), made on DEVICE
    (a 13824 x 5120 weight takes seconds to draw and pack on a CPU)."""
    from vexport.quant.pack import pack_gptq_v1
    from vexport.quant.types import QuantizedWeight, num_groups

    g = torch.Generator(device=device).manual_seed(seed)
    groups = num_groups(in_f, GROUP_SIZE)
    order = torch.randperm(in_f, generator=g, device=device)
    g_idx = (torch.arange(in_f, device=device) // GROUP_SIZE).to(torch.int32)[order]
    zeros = torch.randint(0, 16, (groups, out_f), generator=g, dtype=torch.int32, device=device)
    q = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8, device=device)
    scales = (torch.rand(groups, out_f, generator=g, device=device) * 0.05 + 0.005).half().float()
    return pack_gptq_v1(QuantizedWeight(q, scales, zeros, g_idx, 4, GROUP_SIZE, False, True))


def errors(out: torch.Tensor, expected: torch.Tensor) -> dict:
    diff = (out.float() - expected.float()).abs()
    return {"max_abs_err": float(diff.max()), "rel_err": float(diff.max() / expected.float().abs().max())}


def measure(in_f: int, out_f: int, tokens: int, tensors: dict, weight: torch.Tensor, timed: bool) -> dict:
    """One (shape, tokens) row: errors always, times only when ``timed``."""
    from vexport.backends.gptq import QuantLinear
    from vexport.kernels.int4_matmul import int4_matmul
    from vexport.kernels.reference import int4_matmul_reference

    x = torch.randn(tokens, in_f, device=weight.device, dtype=weight.dtype)
    layer = QuantLinear.from_packed(tensors)
    kernel = lambda: int4_matmul(x, **tensors)  # noqa: E731
    dense = lambda: torch.nn.functional.linear(x, weight)  # noqa: E731
    shipped = lambda: layer(x)  # noqa: E731
    out, expected = kernel(), dense()
    row = {"shape": f"{in_f}->{out_f}", "tokens": tokens, **errors(out, expected),
           "max_abs_err_vs_fp32_reference": errors(out, int4_matmul_reference(x, **tensors))["max_abs_err"]}
    if not timed:
        return row
    from triton.testing import do_bench

    kernel_ms, dense_ms, shipped_ms = (do_bench(f, warmup=25, rep=100) for f in (kernel, dense, shipped))
    int4_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {**row, "int4_us": kernel_ms * 1e3, "fp16_linear_us": dense_ms * 1e3, "fp16_over_int4": dense_ms / kernel_ms,
            "shipped_us": shipped_ms * 1e3, "shipped_path": "triton" if tokens <= _triton_rows() else "dequant+cuBLAS",
            "int4_weight_GBps": int4_bytes / (kernel_ms * 1e-3) / 1e9}


def _triton_rows() -> int:
    from vexport.backends.gptq import TRITON_MAX_TOKENS

    return TRITON_MAX_TOKENS


def run(shapes: list[tuple[int, int]], tokens: list[int], device: str, timed: bool) -> list[dict]:
    from vexport.quant.pack import dequantize_gptq_v1

    dtype = torch.float16
    rows = []
    for seed, (in_f, out_f) in enumerate(shapes):
        tensors = gptq_tensors(in_f, out_f, device, seed)
        weight = dequantize_gptq_v1(tensors, dtype=dtype)
        for m in tokens:
            rows.append(measure(in_f, out_f, m, tensors, weight, timed))
            log.info("%s", _line(rows[-1]))
        del tensors, weight
    return rows


def _line(row: dict) -> str:
    if "int4_us" not in row:
        return f"| {row['shape']} | {row['tokens']} | {row['max_abs_err']:.2e} | {row['rel_err']:.2e} |"
    return (f"| {row['shape']} | {row['tokens']} | {row['int4_us']:.1f} | {row['fp16_linear_us']:.1f} | "
            f"{row['fp16_over_int4']:.2f}x | {row['shipped_us']:.1f} ({row['shipped_path']}) | "
            f"{row['int4_weight_GBps']:.0f} | {row['max_abs_err']:.2e} | {row['rel_err']:.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 4096])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, correctness only, no timings")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    on_gpu = torch.cuda.is_available()
    smoke = args.smoke or not on_gpu
    device = "cuda" if on_gpu else "cpu"
    if smoke:
        log.info("smoke test (tiny shapes, correctness only, no timings) on %s", device)
        log.info("| shape | tokens | max abs err vs dequantized matmul | relative |\n|---|---|---|---|")
    else:
        log.info("device: %s; fp16, group %d, act-order; shipped path: Triton up to %d rows",
                 torch.cuda.get_device_name(), GROUP_SIZE, _triton_rows())
        log.info("| shape | tokens | int4 Triton µs | fp16 F.linear µs | F.linear / int4 | vexport QuantLinear µs "
                 "| int4 weight GB/s | max abs err vs dequantized fp16 | relative |\n|%s", "---|" * 9)
    rows = run(SMOKE_SHAPES if smoke else SHAPES_13B, [1, 5, 33] if smoke else args.tokens, device, not smoke)
    worst = max(r["rel_err"] for r in rows)
    figures = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "smoke": smoke, "dtype": "float16",
               "group_size": GROUP_SIZE, "triton_max_rows": _triton_rows(),
               "rows": rows, "worst_rel_err": worst}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if worst > 1e-2:
        raise SystemExit(f"int4 kernel error {worst:.2e} (relative) against the dequantized matmul is above 1e-2")


if __name__ == "__main__":
    main()
