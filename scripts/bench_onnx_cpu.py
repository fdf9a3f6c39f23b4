"""Tokens/s of ONNX graphs against transformers eager on the CPU, all in one run, printed as ratios.

Rows: transformers fp32 eager (the reference, ratio 1.00), vexport's plain graph (``optimize=False``), the
optimized graph in fp32 and int4 (MatMulNBits from a GPTQ checkpoint, with int8 activations and with float
compute) and, when ``onnxruntime-genai`` is installed, its model builder's graph of the same backbone (fp32 and int4
RTN, ``exclude_lm_head``).

Every row runs in a process of its own, one row after the other, and the rows are cycled ``--rounds`` times; a
cell is the median over rounds of each round's median call. Sessions keep ONNX Runtime's defaults (worker threads
spin between operators, as vexport's runtime leaves them), which is why rows do not share a process: spinning
threads of an idle session, or torch's OpenMP threads, would slow the next row down.

    python scripts/bench_onnx_cpu.py --work /tmp/bench_onnx            # builds the trained 135M value model
    python scripts/bench_onnx_cpu.py --model DIR --gptq GPTQ_DIR --reps 5 --rounds 3
    python scripts/bench_onnx_cpu.py --model DIR --gptq GPTQ_DIR --shapes 1x64 --rounds 8 \
        --rows "vexport optimized fp32" "GenAI builder fp32, exclude_lm_head"     # a closer look at two rows

With a CUDA GPU and onnxruntime-gpu, ``--cuda`` adds ONNX Runtime's CUDA provider in fp16 against torch fp16 eager
at 8x1024.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

SHAPES = ((1, 64), (1, 512), (8, 256))
THREADS = 2
Runner = Callable[[np.ndarray, np.ndarray], object]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_onnx"), help="folder for models and graphs")
    parser.add_argument("--model", type=Path, help="value model folder (default: build the trained 135M model)")
    parser.add_argument("--gptq", type=Path, help="GPTQ v1 checkpoint of --model (default: GPTQ-export one)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per row, shape and round")
    parser.add_argument("--rounds", type=int, default=3, help="times every row is measured, in turn")
    parser.add_argument("--rows", nargs="+", help="measure only these rows (names as printed; eager always runs)")
    parser.add_argument("--shapes", nargs="+", help="BATCHxSEQUENCE shapes (default: 1x64 1x512 8x256)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one row, JSON spec
    parser.add_argument("--no-genai", action="store_true", help="skip the ONNX Runtime GenAI builder rows")
    parser.add_argument("--cuda", action="store_true", help="add the fp16 CUDA comparison at 8x1024")
    return parser.parse_args()


def prepare_models(args: argparse.Namespace) -> tuple[Path, Path]:
    from vexport.export.gptq import export_gptq
    from vexport.trained import make_trained_value_model

    model = args.model or args.work / "trained"
    if not (model / "config.json").is_file():
        make_trained_value_model(model)
    gptq = args.gptq or args.work / "gptq"
    if not (gptq / "config.json").is_file():
        export_gptq(model, gptq, samples=32, seq_len=256, force=True)
    return model, gptq


def export_graphs(model: Path, gptq: Path, work: Path) -> dict[str, Path]:
    from vexport.export.onnx import export_onnx

    plan = {"vexport plain fp32": (model, False, None), "vexport optimized fp32": (model, True, None),
            "vexport optimized int4, int8 activations": (gptq, True, 4),
            "vexport optimized int4, float compute": (gptq, True, None)}
    graphs = {}
    for label, (source, optimize, level) in plan.items():
        out = work / label.replace(" ", "_").replace(",", "")
        if not (out / "manifest.json").is_file():
            export_onnx(source, out, "float32", optimize=optimize, int4_accuracy_level=level, force=True)
        graphs[label] = out / "model.onnx"
    return graphs


def causal_lm_folder(model: Path, dest: Path) -> Path:
    """The value model's backbone as a LlamaForCausalLM folder (tied lm_head) for the GenAI builder."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], tie_word_embeddings=True)
    for key in ("num_labels", "id2label", "label2id"):
        config.pop(key, None)
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    state = {k: v for k, v in load_file(model / "model.safetensors").items() if not k.startswith("score.")}
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model / name).is_file():
            shutil.copyfile(model / name, dest / name)
    return dest


def genai_graphs(model: Path, work: Path) -> dict[str, Path]:
    """GenAI builder graphs (fp32, int4), or {} with a printed reason when the builder is missing or fails."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        print("onnxruntime-genai is not installed: the GenAI builder rows are skipped")
        return {}
    hf = causal_lm_folder(model, work / "causal_lm")
    graphs = {}
    for precision in ("fp32", "int4"):
        out = work / f"genai_{precision}"
        if not (out / "model.onnx").is_file():
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-i", str(hf),
                   "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(work / "genai_cache"),
                   "--extra_options", "exclude_lm_head=true"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode or not (out / "model.onnx").is_file():
                print(f"GenAI builder ({precision}) failed, row skipped: {done.stderr.strip().splitlines()[-1:]}")
                continue
        graphs[f"GenAI builder {precision}, exclude_lm_head"] = out / "model.onnx"
    return graphs


def ort_runner(graph: Path, providers: list | None = None, head_dim: int = 64) -> Runner:
    """A session over GRAPH that feeds input_ids, attention_mask and, for GenAI graphs, an empty KV cache."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(graph), options, providers=providers or ["CPUExecutionProvider"])
    inputs = session.get_inputs()
    first_output = session.get_outputs()[0].name

    def run(ids: np.ndarray, mask: np.ndarray):
        feeds = {"input_ids": ids, "attention_mask": mask}
        for node in inputs:
            if node.name.startswith("past_key_values"):
                kv_heads = node.shape[1]
                dtype = np.float16 if "float16" in node.type else np.float32
                feeds[node.name] = np.zeros((ids.shape[0], kv_heads, 0, head_dim), dtype)
            elif node.name == "position_ids":
                feeds[node.name] = np.maximum(mask.cumsum(1) - 1, 0)
        return session.run([first_output], feeds)

    return run


def torch_runner(model: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Runner:
    from transformers import AutoModelForTokenClassification

    module = AutoModelForTokenClassification.from_pretrained(model, attn_implementation="eager", dtype=dtype)
    module = module.to(device).eval()

    def run(ids: np.ndarray, mask: np.ndarray):
        with torch.inference_mode():
            out = module(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device))
            if device != "cpu":
                torch.cuda.synchronize()
            return out.logits

    return run


def time_calls(run: Runner, shapes, reps: int, vocab: int) -> dict[tuple, float]:
    """Median seconds per call of RUN at every shape, after one warm-up call."""
    rng = np.random.default_rng(0)
    medians = {}
    for shape in shapes:
        ids = rng.integers(0, vocab, size=shape, dtype=np.int64)
        mask = np.ones(shape, np.int64)
        run(ids, mask)
        calls = []
        for _ in range(reps):
            start = time.perf_counter()
            run(ids, mask)
            calls.append(time.perf_counter() - start)
        medians[shape] = statistics.median(calls)
    return medians


def worker(spec: dict) -> None:
    """One row in this process: print its median seconds per shape as JSON."""
    torch.set_num_threads(THREADS)
    if spec["kind"] == "torch":
        run = torch_runner(Path(spec["path"]), spec.get("device", "cpu"), getattr(torch, spec.get("dtype", "float32")))
    else:
        run = ort_runner(Path(spec["path"]), spec.get("providers"), spec["head_dim"])
    shapes = [tuple(s) for s in spec["shapes"]]
    medians = time_calls(run, shapes, spec["reps"], spec["vocab"])
    print(json.dumps([[list(s), t] for s, t in medians.items()]))


def measure(rows: dict[str, dict], shapes, reps: int, rounds: int, vocab: int) -> dict[str, dict[tuple, float]]:
    """Median over ROUNDS of every row's per-round median, each row measured in a fresh process."""
    times: dict[str, dict[tuple, list[float]]] = {name: {s: [] for s in shapes} for name in rows}
    for _ in range(rounds):
        for name, spec in rows.items():
            spec = {**spec, "shapes": [list(s) for s in shapes], "reps": reps, "vocab": vocab}
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                  text=True, check=False)
            if done.returncode:
                raise SystemExit(f"row {name!r} failed: {done.stderr.strip().splitlines()[-1:]}")
            for shape, seconds in json.loads(done.stdout.strip().splitlines()[-1]):
                times[name][tuple(shape)].append(seconds)
    return {name: {s: statistics.median(v) for s, v in per.items()} for name, per in times.items()}


def print_table(medians: dict[str, dict[tuple, float]], shapes, reference: str) -> None:
    heads = [f"{b}x{t}" for b, t in shapes]
    print(f"| graph | {' | '.join(heads)} |")
    print("|---|" + "---|" * len(heads))
    for name, per in medians.items():
        cells = [f"{medians[reference][s] / per[s]:.2f}x ({s[0] * s[1] / per[s]:,.0f} tok/s)" for s in shapes]
        print(f"| {name} | {' | '.join(cells)} |")


def cuda_comparison(model: Path, work: Path, reps: int, rounds: int) -> None:
    """ONNX Runtime CUDA provider, fp16 optimized graph, against torch fp16 eager at 8x1024."""
    import onnxruntime as ort

    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        print("--cuda: no CUDA GPU with onnxruntime-gpu here, skipped")
        return
    from vexport.export.onnx import export_onnx

    out = work / "vexport_optimized_fp16"
    if not (out / "manifest.json").is_file():
        export_onnx(model, out, "float16", force=True)
    rows = {"torch fp16 eager (cuda)": {"kind": "torch", "path": str(model), "device": "cuda", "dtype": "float16"},
            "vexport optimized fp16 (ORT CUDA)": {"kind": "ort", "path": str(out / "model.onnx"), "head_dim": 64,
                                                  "providers": ["CUDAExecutionProvider"]}}
    shapes = ((8, 1024),)
    print_table(measure(rows, shapes, reps, rounds, 49152), shapes, "torch fp16 eager (cuda)")


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    model, gptq = prepare_models(args)
    print(f"model {model}; int4 graphs from {gptq}")
    graphs = {**export_graphs(model, gptq, args.work), **({} if args.no_genai else genai_graphs(model, args.work))}
    config = json.loads((model / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rows = {"transformers fp32 eager": {"kind": "torch", "path": str(model)}}
    rows.update({name: {"kind": "ort", "path": str(path), "head_dim": head_dim} for name, path in graphs.items()
                 if not args.rows or name in args.rows})
    shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes) if args.shapes else SHAPES
    print(f"CPU, {THREADS} threads, each row in its own process, {args.rounds} rounds of {args.reps} calls, "
          "median of round medians; ratio = tokens/s over eager")
    print_table(measure(rows, shapes, args.reps, args.rounds, config["vocab_size"]), shapes,
                "transformers fp32 eager")
    if args.cuda:
        cuda_comparison(model, args.work, args.reps, args.rounds)


if __name__ == "__main__":
    main()
