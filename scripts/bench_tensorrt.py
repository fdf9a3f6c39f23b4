"""TensorRT engines for the tiny model and for 13B-sized layers: build, check, and tokens/s at batch 8 x 1024.

    python scripts/bench_tensorrt.py --work /tmp/bench_trt              # needs TensorRT 10+ and a CUDA GPU
    python scripts/bench_tensorrt.py --work /tmp/bench_trt --onnx-only  # no GPU: the TensorRT-bound ONNX + ORT check

The 13B-sized model has Llama-2-13B's layer shapes (hidden 5120, intermediate 13824, 40 heads) and 2 decoder
layers, random weights and the tiny tokenizer's vocabulary; int4 is an RTN GPTQ checkpoint (group 128) of it. Each engine row prints the
ONNX Runtime check of its ONNX, the engine's check against the fp16 reference, tokens/s of the engine and of torch
fp16 eager at 8 x 1024 (median of --reps after one warm-up), the device, and the engine's last layers (the head).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

log = logging.getLogger("bench_tensorrt")
SIZES = {"tiny": {}, "13b-layers": dict(hidden_size=5120, intermediate_size=13824, num_heads=40, num_layers=2)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_trt"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--onnx-only", action="store_true", help="only export and ORT-check the TensorRT-bound ONNX")
    return parser.parse_args()


def make_models(work: Path) -> dict[str, tuple[Path, Path]]:
    """(fp model, RTN GPTQ folder) per size, built once."""
    from vexport.export.rtn import write_rtn_checkpoint
    from vexport.tiny import make_tiny_value_model

    models = {}
    for name, shape in SIZES.items():
        fp = work / name
        if not fp.exists():
            make_tiny_value_model(fp, seed=0, max_position_embeddings=2048, **shape)
        gptq = work / f"{name}-gptq"
        if not gptq.exists():
            write_rtn_checkpoint(fp, gptq, group_size=128 if name != "tiny" else 32)
        models[name] = (fp, gptq)
    return models


def tokens_per_second(model, reps: int) -> float:
    ids = torch.randint(0, 100, (8, 1024), device="cuda")
    mask = torch.ones_like(ids)
    model.values(ids, mask)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.values(ids, mask)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return ids.numel() / statistics.median(times)


def engine_row(name: str, kind: str, fp: Path, gptq: Path, work: Path, reps: int) -> dict:
    from vexport.checker import check
    from vexport.export.tensorrt import ShapeProfile
    from vexport.export.tensorrt_chain import build_engine
    from vexport.manifest import read_manifest
    from vexport.runtime import load

    folder = work / f"engine-{name}-{kind}"
    start = time.perf_counter()
    build_engine(gptq if kind == "int4" else fp, folder, profile=ShapeProfile((1, 1), (8, 1024), (8, 2048)),
                 int4=kind == "int4", reference=fp, force=True)
    manifest = read_manifest(folder)
    engine_check = check(folder, fp, device="cuda").result.summary()
    return {"model": name, "engine": kind, "build_s": round(time.perf_counter() - start, 1),
            "onnx_check": manifest.format_options["onnx_parity"], "engine_check": engine_check,
            "engine_tokens_per_s": tokens_per_second(load(folder), reps),
            "torch_fp16_tokens_per_s": tokens_per_second(load(fp, device="cuda"), reps),
            "device": f"{manifest.format_options['gpu']} (TensorRT {manifest.format_options['tensorrt_version']})",
            "last_layers": json.loads((folder / "layers.json").read_text())[-4:]}


def onnx_row(name: str, kind: str, fp: Path, gptq: Path, work: Path) -> dict:
    from vexport.checker import check
    from vexport.export.tensorrt_onnx import export_tensorrt_onnx

    folder = export_tensorrt_onnx(gptq if kind == "int4" else fp, work / f"onnx-{name}-{kind}", "float16", force=True)
    return {"model": name, "onnx": kind, "check_cpu": check(folder, fp, device="cpu").result.summary()}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    for name, (fp, gptq) in make_models(args.work).items():
        for kind in ("fp16", "int4"):
            row = (onnx_row(name, kind, fp, gptq, args.work) if args.onnx_only
                   else engine_row(name, kind, fp, gptq, args.work, args.reps))
            log.info("%s", json.dumps(row))


if __name__ == "__main__":
    main()
