"""The fused value head (``vexport.kernels.value_head``) against Hugging Face's RMSNorm + score Linear.

On a CUDA GPU, for 13B shapes (hidden 5120, float16) at 1, 512 and 16384 tokens, measured side by side in
one run: the time of each, their ratio, and the fused kernel's achieved bandwidth (bytes it must move /
time) as a fraction of this GPU's device-to-device copy bandwidth (``dst.copy_(src)`` of 1 GiB, read +
write), measured in the same run.

Without a GPU this is a smoke test only: tiny shapes under the Triton interpreter, checked against the
reference; it prints no speed figures.

    python scripts/bench_value_head.py [--hidden 5120] [--tokens 1 512 16384] [--dtype float16] [--smoke]
                                       [--json PATH]
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

log = logging.getLogger("bench_value_head")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def head_modules(hidden: int, dtype: torch.dtype, device: str) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """Hugging Face's LlamaRMSNorm and a Linear(hidden, 1) with bias, random weights, in ``dtype``."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(hidden, eps=1e-5)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    score = torch.nn.Linear(hidden, 1)
    return norm.to(device, dtype), score.to(device, dtype)


def fused(norm: torch.nn.Module, score: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    from vexport.kernels.value_head import value_head

    return value_head(x, norm.weight, score.weight, score.bias, eps=norm.variance_epsilon)


def unfused(norm: torch.nn.Module, score: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return score(norm(x))[:, 0].float()


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (counting the read and the write)."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=500)
    return 2 * src.numel() / (ms * 1e-3)


def bench_size(tokens: int, hidden: int, dtype: torch.dtype, copy_bw: float) -> dict:
    from triton.testing import do_bench

    norm, score = head_modules(hidden, dtype, "cuda")
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    torch.testing.assert_close(fused(norm, score, x), unfused(norm, score, x), atol=2e-2, rtol=2e-2)
    fused_ms = do_bench(lambda: fused(norm, score, x), warmup=50, rep=500)
    unfused_ms = do_bench(lambda: unfused(norm, score, x), warmup=50, rep=500)
    moved = x.numel() * x.element_size() + 2 * hidden * x.element_size() + 4 * tokens  # states, weights, out
    return {"tokens": tokens, "fused_us": fused_ms * 1e3, "hf_us": unfused_ms * 1e3,
            "speedup": unfused_ms / fused_ms, "bw_fraction": moved / (fused_ms * 1e-3) / copy_bw}


def run_gpu(args: argparse.Namespace) -> dict:
    dtype = DTYPES[args.dtype]
    copy_bw = copy_bandwidth()
    log.info("device: %s; copy bandwidth (read + write): %.0f GB/s", torch.cuda.get_device_name(), copy_bw / 1e9)
    log.info("| tokens | fused µs | HF norm + linear µs | HF / fused | fused bandwidth / copy bandwidth |")
    log.info("|---|---|---|---|---|")
    rows = []
    for tokens in args.tokens:
        rows.append(r := bench_size(tokens, args.hidden, dtype, copy_bw))
        log.info("| %d | %.1f | %.1f | %.2fx | %.0f%% |", r["tokens"], r["fused_us"], r["hf_us"], r["speedup"],
                 100 * r["bw_fraction"])
    return {"device": torch.cuda.get_device_name(), "smoke": False, "hidden": args.hidden, "dtype": args.dtype,
            "copy_GBps": copy_bw / 1e9, "rows": rows}


@torch.inference_mode()
def run_smoke() -> dict:
    from vexport.kernels.reference import value_head_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("smoke test on %s (tiny shapes, correctness only, no timings; the Triton interpreter on a CPU)", device)
    rows = []
    for name, dtype in DTYPES.items():
        norm, score = head_modules(123, dtype, device)
        x = torch.randn(5, 123, dtype=dtype, device=device)
        expected = value_head_reference(x, norm.weight, score.weight, score.bias, eps=norm.variance_epsilon)
        got = fused(norm, score, x)
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)
        rows.append({"dtype": name, "tokens": 5, "hidden": 123, "max_abs_err": float((got - expected).abs().max())})
        log.info("%s: fused head matches the reference on [5, 123]", dtype)
    return {"device": device, "smoke": True, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 512, 16384])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, correctness only, no timings")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    figures = run_gpu(args) if torch.cuda.is_available() and not args.smoke else run_smoke()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
