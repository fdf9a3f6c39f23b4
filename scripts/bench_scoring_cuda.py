"""Whole-model scoring throughput on a CUDA GPU: vexport's torch fp16 fast path and its ONNX Runtime path
against Hugging Face eager fp16, measured side by side in one run.

The model has 13B-sized layers (hidden 5120, intermediate 13824, 40 heads; random weights, which is all
speed needs) and ``--layers`` decoder layers (default 8, about 2.6B parameters: enough to be representative
on one GPU). Two workloads: batch 8 x 1024 tokens, and ``--mixed`` sequences of random lengths 32..1024.
For each path: real tokens per second, the ratio to HF eager, and the model FLOP utilisation
``2 x parameters x real tokens / time / peak bf16 FLOP/s`` (peak from the device name, or ``--peak-tflops``).

- HF eager: ``AutoModelForTokenClassification`` (``attn_implementation="eager"``), batches of 8 in input
  order, padded to the longest with an attention mask, per-token logits.
- vexport torch: ``vexport.load`` (fp16, fused value head) + ``FastScorer`` (length-sorted token-budget
  batches, SDPA causal, head at real tokens only, one host sync at the end), per-token values.
- vexport ONNX Runtime: the fp16 ONNX export on the CUDA provider, length-sorted token-budget batches
  (skipped when onnxruntime-gpu is not installed).

Without a GPU (or with ``--smoke``) this is a smoke test only: a tiny model on the CPU through the same three
paths, checked for agreement; it prints no speed figures. ``--json PATH`` also writes the table's figures.

    python scripts/bench_scoring_cuda.py [--layers 8] [--mixed 64] [--batch-tokens 16384] [--compile] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("bench_scoring_cuda")
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense, no sparsity


def build_model(folder: Path, layers: int, on_gpu: bool) -> int:
    """A random fp16 value model (13B-sized layers on a GPU, tiny otherwise); returns its parameter count."""
    from vexport.tiny import make_tiny_value_model

    shape = dict(hidden_size=5120, intermediate_size=13824, num_heads=40, max_position_embeddings=2048) \
        if on_gpu else dict(hidden_size=64, num_heads=4)
    make_tiny_value_model(folder, num_layers=layers, dtype=torch.float16 if on_gpu else torch.float32, **shape)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        return sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())


def workloads(mixed: int, vocab: int, on_gpu: bool) -> dict[str, list[list[int]]]:
    rng = np.random.default_rng(0)
    full, low = (1024, 32) if on_gpu else (24, 2)
    fixed = [rng.integers(1, vocab, full).tolist() for _ in range(8)]
    mixed_seqs = [rng.integers(1, vocab, int(n)).tolist() for n in rng.integers(low, full + 1, mixed)]
    return {f"8 x {full}": fixed, f"{mixed} mixed {low}..{full}": mixed_seqs}


def hf_eager(folder: Path, device: str) -> Callable[[Sequence[Sequence[int]]], list[np.ndarray]]:
    from transformers import AutoModelForTokenClassification

    from vexport.batching import pad_batch

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForTokenClassification.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    model = model.to(device).eval()

    @torch.inference_mode()
    def score(seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        outs = []
        for start in range(0, len(seqs), 8):
            chunk = seqs[start:start + 8]
            ids, mask = pad_batch(chunk, 0, "right")
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[..., 0]
            outs += [logits[r, : len(s)] for r, s in enumerate(chunk)]
        return [o.float().cpu().numpy() for o in outs]

    return score


def vexport_torch(folder: Path, device: str, batch_tokens: int, compile_backbone: bool):
    from vexport.backends.cuda_scoring import FastScorer, FastScoringOptions
    from vexport.runtime import load

    model = load(folder, device=device)
    log.info("vexport torch: %s, fused head %s", model.precision, model.runner.head.fused)
    return FastScorer(model.runner, FastScoringOptions(batch_tokens, compile_backbone)).token_values


def vexport_onnx(folder: Path, workdir: Path, device: str, batch_tokens: int):
    from vexport.backends.onnxrt import _cuda_provider_usable
    from vexport.batching import pad_batch, plan_batches, unpad
    from vexport.export.onnx import export_onnx
    from vexport.runtime import load

    if device == "cuda" and not _cuda_provider_usable():
        log.info("vexport ONNX Runtime: skipped (onnxruntime-gpu with the CUDA provider is not installed)")
        return None
    model = load(export_onnx(folder, workdir / "onnx", "float16" if device == "cuda" else "float32"), device=device)

    def score(seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        out: list = [None] * len(seqs)
        for rows in plan_batches([len(s) for s in seqs], batch_tokens):
            ids, mask = pad_batch([seqs[i] for i in rows], 0, "right")
            for i, row in zip(rows, unpad(model.values(ids, mask), mask)):
                out[i] = row
        return out

    return score


def timed(score: Callable, seqs: list[list[int]], repeats: int) -> tuple[float, list[np.ndarray]]:
    """Best of ``repeats`` timed runs after one warm-up run (which also gives the values)."""
    values = score(seqs)
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        score(seqs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, values


def peak_flops(override: float | None) -> float | None:
    if override:
        return override * 1e12
    name = torch.cuda.get_device_name()
    hits = [tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name]
    return hits[0] * 1e12 if hits else None


def report(name: str, paths: dict, seqs: list[list[int]], params: int, peak: float | None, repeats: int) -> list[dict]:
    """One table row per path; ``repeats=0`` (the CPU smoke test) checks agreement and prints no times."""
    tokens = sum(len(s) for s in seqs)
    results = {path: timed(score, seqs, repeats) if repeats else (0.0, score(seqs)) for path, score in paths.items()}
    base_time, base_values = results["HF eager fp16"]
    rows = []
    for path, (seconds, values) in results.items():
        err = max(float(np.abs(a - b).max()) for a, b in zip(values, base_values))
        rows.append({"workload": name, "path": path, "real_tokens": tokens, "max_abs_diff_vs_hf": err})
        if not repeats:
            log.info("| %s | %s | - | - | - | %.2e |", name, path, err)
            continue
        rows[-1].update(tokens_per_s=tokens / seconds, vs_hf_eager=base_time / seconds,
                        mfu=2 * params * tokens / seconds / peak if peak else None)
        mfu = f"{rows[-1]['mfu']:.1%}" if peak else "n/a (pass --peak-tflops)"
        log.info("| %s | %s | %.0f | %.2fx | %s | %.2e |", name, path, tokens / seconds, base_time / seconds, mfu, err)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--mixed", type=int, default=64)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the vexport backbone")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of this GPU")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="the tiny CPU model, agreement only, no timings")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    on_gpu = torch.cuda.is_available() and not args.smoke
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu:
        log.info("no CUDA GPU: smoke test on the CPU with a tiny model (agreement only, no speed figures)")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp) / "model"
        params = build_model(folder, args.layers if on_gpu else 2, on_gpu)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(folder).vocab_size
        paths = {"HF eager fp16": hf_eager(folder, device),
                 "vexport torch fp16": vexport_torch(folder, device, args.batch_tokens, args.compile),
                 "vexport ONNX Runtime fp16": vexport_onnx(folder, Path(tmp), device, args.batch_tokens)}
        paths = {k: v for k, v in paths.items() if v is not None}
        peak = peak_flops(args.peak_tflops) if on_gpu else None
        log.info("device: %s; %d layers, %.2fB parameters", torch.cuda.get_device_name() if on_gpu else "cpu",
                 args.layers if on_gpu else 2, params / 1e9)
        log.info("| workload | path | real tokens/s | vs HF eager | MFU | max abs diff vs HF |")
        log.info("|---|---|---|---|---|---|")
        rows = [row for name, seqs in workloads(args.mixed, vocab, on_gpu).items()
                for row in report(name, paths, seqs, params, peak, args.repeats if on_gpu else 0)]
    if args.json:
        figures = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "smoke": not on_gpu,
                   "layers": args.layers if on_gpu else 2, "parameters": params, "batch_tokens": args.batch_tokens,
                   "compile": args.compile, "peak_flops": peak, "paths": list(paths), "rows": rows}
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
