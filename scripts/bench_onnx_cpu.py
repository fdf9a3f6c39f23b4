"""Tokens/s of ONNX graphs against transformers eager on the CPU, all in one run, printed as ratios.

Rows: transformers fp32 eager (the reference, ratio 1.00), vexport's plain graph (``optimize=False``), the
optimized graph in fp32 and int4 (MatMulNBits from a GPTQ checkpoint) and, when ``onnxruntime-genai`` is installed,
its model builder's graph of the same backbone (fp32 and int4 RTN, ``exclude_lm_head``). Repetitions are
interleaved across rows (one repetition of every row, then the next), and each cell is a median.

    python scripts/bench_onnx_cpu.py --work /tmp/bench_onnx            # builds the trained 135M value model
    python scripts/bench_onnx_cpu.py --model DIR --gptq GPTQ_DIR --reps 7

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
    parser.add_argument("--reps", type=int, default=5)
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

    plan = {"vexport plain fp32": (model, False), "vexport optimized fp32": (model, True),
            "vexport optimized int4": (gptq, True)}
    graphs = {}
    for label, (source, optimize) in plan.items():
        out = work / label.replace(" ", "_").replace("(", "").replace(")", "")
        if not (out / "manifest.json").is_file():
            export_onnx(source, out, "float32", optimize=optimize, force=True)
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
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle sessions must not steal cores
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


def measure(runners: dict[str, Runner], shapes, reps: int, vocab: int) -> dict[str, dict[tuple, float]]:
    """Median seconds per call for every runner and shape, repetitions interleaved across runners."""
    rng = np.random.default_rng(0)
    times: dict[str, dict[tuple, list[float]]] = {name: {s: [] for s in shapes} for name in runners}
    for shape in shapes:
        ids = rng.integers(0, vocab, size=shape, dtype=np.int64)
        mask = np.ones(shape, np.int64)
        for run in runners.values():  # warm-up
            run(ids, mask)
        for _ in range(reps):
            for name, run in runners.items():
                start = time.perf_counter()
                run(ids, mask)
                times[name][shape].append(time.perf_counter() - start)
    return {name: {s: statistics.median(v) for s, v in per.items()} for name, per in times.items()}


def print_table(medians: dict[str, dict[tuple, float]], shapes, reference: str) -> None:
    heads = [f"{b}x{t}" for b, t in shapes]
    print(f"| graph | {' | '.join(heads)} |")
    print("|---|" + "---|" * len(heads))
    for name, per in medians.items():
        cells = [f"{medians[reference][s] / per[s]:.2f}x ({s[0] * s[1] / per[s]:,.0f} tok/s)" for s in shapes]
        print(f"| {name} | {' | '.join(cells)} |")


def cuda_comparison(model: Path, work: Path, reps: int) -> None:
    """ONNX Runtime CUDA provider, fp16 optimized graph, against torch fp16 eager at 8x1024."""
    import onnxruntime as ort

    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        print("--cuda: no CUDA GPU with onnxruntime-gpu here, skipped")
        return
    from vexport.export.onnx import export_onnx

    out = work / "vexport_optimized_fp16"
    if not (out / "manifest.json").is_file():
        export_onnx(model, out, "float16", force=True)
    runners = {"torch fp16 eager (cuda)": torch_runner(model, "cuda", torch.float16),
               "vexport optimized fp16 (ORT CUDA)": ort_runner(out / "model.onnx", ["CUDAExecutionProvider"])}
    shapes = ((8, 1024),)
    print_table(measure(runners, shapes, reps, 49152), shapes, "torch fp16 eager (cuda)")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(THREADS)
    args.work.mkdir(parents=True, exist_ok=True)
    model, gptq = prepare_models(args)
    print(f"model {model}; int4 graph from {gptq}")
    graphs = {**export_graphs(model, gptq, args.work), **({} if args.no_genai else genai_graphs(model, args.work))}
    runners = {"transformers fp32 eager": torch_runner(model)}
    config = json.loads((model / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    runners.update({name: ort_runner(path, head_dim=head_dim) for name, path in graphs.items()})
    vocab = config["vocab_size"]
    print(f"CPU, {THREADS} threads, {args.reps} interleaved repetitions, median; ratio = tokens/s over eager")
    print_table(measure(runners, SHAPES, args.reps, vocab), SHAPES, "transformers fp32 eager")
    if args.cuda:
        cuda_comparison(model, args.work, args.reps)


if __name__ == "__main__":
    main()
