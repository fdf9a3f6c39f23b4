"""Tokens/s of ONNX graphs against transformers eager and llama.cpp on the CPU, all in one run, printed as ratios.

Rows: transformers fp32 eager (the reference, ratio 1.00), vexport's plain graph (``optimize=False``), the
optimized graph in fp32 and int4 (MatMulNBits from a GPTQ checkpoint, with int8 activations and with float
compute); when ``onnxruntime-genai`` is installed, its model builder's graph of the same backbone (fp32 and int4
RTN, ``exclude_lm_head``); and when ``llama-cpp-python`` is installed and ``--gguf-converter`` names llama.cpp's
``convert_hf_to_gguf.py``, llama.cpp on the same backbone as GGUF F32, F16, Q8_0 and Q4_0.

Every row runs in a process of its own, one row after the other, and the rows are cycled ``--rounds`` times; a
cell is the median over rounds of each round's median call. Sessions keep ONNX Runtime's defaults (worker threads
spin between operators, as vexport's runtime leaves them), which is why rows do not share a process: spinning
threads of an idle session, or torch's OpenMP threads, would slow the next row down. Every row also scores the
built-in prompt groups once (each sample alone, batch 1), and the table gives the SQNR of its per-token values
against transformers fp32's, so that no row buys speed with wrong values.

The llama.cpp rows: the backbone is saved as a LlamaForCausalLM folder, converted by ``convert_hf_to_gguf.py``
(``--outtype f32`` and ``f16``, run with this interpreter), and the F32 file is quantized to Q8_0 and Q4_0 with
llama-cpp-python's ``llama_model_quantize``. A row loads its GGUF with per-token embeddings (``embeddings``,
pooling none: the hidden states after the final RMSNorm, no lm_head) and applies the value model's score head to
them in numpy; 8x256 is one ``llama_decode`` batch of 8 sequences of 256 tokens (sequence ids 0-7, ``n_ubatch``
as large as the batch). llama-cpp-python builds llama.cpp from source (minutes); the converter is in its sdist:

    pip install llama-cpp-python==0.3.36 sentencepiece      # compiles llama.cpp; CMAKE_ARGS="-DGGML_NATIVE=ON"
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    python scripts/bench_onnx_cpu.py --gguf-converter llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py

    python scripts/bench_onnx_cpu.py --work /tmp/bench_onnx            # builds the trained 135M value model
    python scripts/bench_onnx_cpu.py --model DIR --gptq GPTQ_DIR --reps 5 --rounds 3
    python scripts/bench_onnx_cpu.py --model DIR --gptq GPTQ_DIR --shapes 1x64 --rounds 8 \
        --rows "vexport optimized fp32" "GenAI builder fp32, exclude_lm_head"     # a closer look at two rows

With a CUDA GPU and onnxruntime-gpu, ``--cuda`` adds ONNX Runtime's CUDA provider in fp16 against torch fp16 eager
at 8x1024.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

SHAPES = ((1, 64), (1, 512), (8, 256))
THREADS = 2
REFERENCE = "transformers fp32 eager"
GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0")  # F32 and F16 from the converter, the others quantized from F32
HEAD_TO_HEAD = (("vexport optimized fp32", "llama.cpp F32", 1.3),  # (row, over row, the target)
                ("vexport optimized int4, int8 activations", "llama.cpp Q4_0", 1.2))
LLAMA_CPP_INSTALL = ("pip install llama-cpp-python==0.3.36 sentencepiece (compiles llama.cpp, minutes), and "
                     "--gguf-converter "
                     "naming vendor/llama.cpp/convert_hf_to_gguf.py of its sdist (pip download --no-deps "
                     "--no-binary :all: llama-cpp-python==0.3.36)")
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
    parser.add_argument("--gguf-converter", type=Path, metavar="PATH",
                        help="llama.cpp's convert_hf_to_gguf.py (in the llama-cpp-python sdist) for the llama.cpp rows")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp rows")
    parser.add_argument("--cuda", action="store_true", help="add the fp16 CUDA comparison at 8x1024")
    args = parser.parse_args()
    if args.gguf_converter is not None and not args.gguf_converter.is_file():
        parser.exit(2, f"--gguf-converter {args.gguf_converter}: no such file\n")
    try:
        args.shapes = parse_shapes(args.shapes) if args.shapes else SHAPES
    except ValueError:
        parser.exit(2, f"--shapes {' '.join(args.shapes)}: each shape is BATCHxSEQUENCE, e.g. 8x256\n")
    return args


def parse_shapes(texts: list[str]) -> tuple[tuple[int, int], ...]:
    """'8x256' -> (8, 256); ValueError unless both are positive integers."""
    shapes = tuple(tuple(int(v) for v in text.lower().split("x")) for text in texts)
    if any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(texts)
    return shapes


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
    """The value model's backbone as a LlamaForCausalLM folder (tied lm_head) for the GenAI builder and the
    GGUF converter."""
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


def gguf_files(model: Path, work: Path, converter: Path | None) -> dict[str, Path]:
    """The backbone as GGUF F32, F16, Q8_0 and Q4_0 for the llama.cpp rows, or {} with a printed reason."""
    if importlib.util.find_spec("llama_cpp") is None:
        print(f"llama-cpp-python is not installed: the llama.cpp rows are skipped ({LLAMA_CPP_INSTALL})")
        return {}
    if converter is None:
        print(f"no --gguf-converter: the llama.cpp rows are skipped ({LLAMA_CPP_INSTALL})")
        return {}
    hf = causal_lm_folder(model, work / "causal_lm")
    files = {}
    for kind in GGUF_TYPES:
        path = work / f"backbone-{kind}.gguf"
        if not path.is_file():
            partial = path.with_suffix(".partial")
            failure = (convert_gguf(converter, hf, partial, kind.lower()) if kind in ("F32", "F16")
                       else quantize_gguf(files.get("F32"), partial, kind))
            if failure:
                print(f"GGUF {kind} failed, row skipped: {failure}")
                continue
            partial.rename(path)
        files[kind] = path
    return {f"llama.cpp {kind}": path for kind, path in files.items()}


def convert_gguf(converter: Path, hf: Path, out: Path, outtype: str) -> str | None:
    """HF folder -> GGUF with llama.cpp's converter in a subprocess; None, or why it failed."""
    cmd = [sys.executable, str(converter), str(hf), "--outfile", str(out), "--outtype", outtype]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode or not out.is_file():
        return f"{converter.name} --outtype {outtype}: {done.stderr.strip().splitlines()[-1:]}"
    return None


def quantize_gguf(source: Path | None, out: Path, kind: str) -> str | None:
    """SOURCE (GGUF F32) -> KIND (Q8_0, Q4_0) with llama-cpp-python's llama_model_quantize, in a worker process
    (llama.cpp prints a line per tensor); None, or why it failed."""
    if source is None:
        return "no F32 GGUF to quantize from"
    spec = {"kind": "quantize", "path": str(source), "out": str(out), "type": kind}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode or not out.is_file():
        return f"llama_model_quantize {source.name} -> {kind}: {done.stderr.strip().splitlines()[-1:]}"
    return None


def quantize_in_process(source: Path, out: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = THREADS
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)):
        raise SystemExit(f"llama_model_quantize returned an error for {source} -> {kind}")


def score_head(model: Path) -> tuple[np.ndarray, np.ndarray]:
    """The value model's score.weight [1, hidden] and score.bias [1] (zeros when it has none), float32."""
    from safetensors import safe_open

    head = {}
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(str(shard), framework="numpy") as f:
            head.update({k: f.get_tensor(k) for k in f.keys() if k in ("score.weight", "score.bias")})
    if "score.weight" not in head:
        raise SystemExit(f"{model}: no score.weight in its safetensors files")
    weight = head["score.weight"].astype(np.float32)
    return weight, head.get("score.bias", np.zeros(weight.shape[0], np.float32)).astype(np.float32)


def as_values(out: object, head: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A runner's output as float32 values [batch, seq]: logits [B, T, 1] squeezed, hidden states [B, T, H]
    (GenAI's exclude_lm_head graphs, llama.cpp's embeddings) through the score head."""
    out = out[0] if isinstance(out, (list, tuple)) else out
    out = out.float().numpy() if hasattr(out, "numpy") and not isinstance(out, np.ndarray) else np.asarray(out)
    if out.shape[-1] == 1:
        return out[..., 0].astype(np.float32)
    weight, bias = head
    return (out.astype(np.float32) @ weight.T + bias)[..., 0]


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


def torch_runner(model: Path, device: str = "cpu", dtype: str = "float32") -> Runner:
    import torch
    from transformers import AutoModelForTokenClassification

    module = AutoModelForTokenClassification.from_pretrained(model, attn_implementation="eager",
                                                             dtype=getattr(torch, dtype))
    module = module.to(device).eval()

    def run(ids: np.ndarray, mask: np.ndarray):
        with torch.inference_mode():
            out = module(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device))
            if device != "cpu":
                torch.cuda.synchronize()
            return out.logits

    return run


def llama_cpp_runner(gguf: Path, max_seqs: int, max_len: int, max_tokens: int,
                     head: tuple[np.ndarray, np.ndarray]) -> Runner:
    """llama.cpp over GGUF: every row of a batch is a sequence of one llama_decode batch; the per-token
    embeddings (after the final norm) times the score head are the values. Takes unpadded batches only."""
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise SystemExit(f"{gguf}: llama.cpp could not load it")
    params = llama_cpp.llama_context_default_params()
    params.n_seq_max, params.n_ctx = max_seqs, max_seqs * max_len  # one KV stream of max_len per sequence
    params.n_batch = params.n_ubatch = max_tokens  # a whole call in one micro-batch
    params.n_threads = params.n_threads_batch = THREADS
    params.embeddings, params.pooling_type = True, llama_cpp.LLAMA_POOLING_TYPE_NONE
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise SystemExit(f"{gguf}: llama.cpp could not make a context for {max_seqs} x {max_len} tokens")
    memory, width = llama_cpp.llama_get_memory(ctx), llama_cpp.llama_model_n_embd(model)
    batch = llama_cpp.llama_batch_init(max_tokens, 0, 1)

    def run(ids: np.ndarray, mask: np.ndarray):
        if not mask.all():
            raise ValueError("the llama.cpp runner takes unpadded batches")
        rows, length = ids.shape
        n = rows * length
        batch.n_tokens = n
        np.ctypeslib.as_array(batch.token, (n,))[:] = ids.reshape(-1)
        np.ctypeslib.as_array(batch.pos, (n,))[:] = np.tile(np.arange(length), rows)
        np.ctypeslib.as_array(batch.n_seq_id, (n,))[:] = 1
        np.ctypeslib.as_array(batch.logits, (n,))[:] = 1  # every token an output: per-token embeddings
        for i in range(n):
            batch.seq_id[i][0] = i // length
        llama_cpp.llama_memory_clear(memory, False)  # a fresh prefill; the cache's bytes are overwritten
        if llama_cpp.llama_decode(ctx, batch):
            raise RuntimeError(f"llama_decode failed at {rows}x{length}")
        hidden = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings(ctx), (n, width))
        return as_values(hidden.reshape(rows, length, width), head)[..., None]  # [B, T, 1] like the graphs' logits

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


def fidelity_values(run: Runner, samples: list[list[int]], head) -> np.ndarray:
    """Per-token values of every sample, each run alone (batch 1, no padding), concatenated."""
    return np.concatenate([as_values(run(np.array([ids], np.int64), np.ones((1, len(ids)), np.int64)), head)[0]
                           for ids in samples])


def make_runner(spec: dict, head) -> Runner:
    if spec["kind"] == "torch":
        import torch

        torch.set_num_threads(THREADS)
        return torch_runner(Path(spec["path"]), spec.get("device", "cpu"), spec.get("dtype", "float32"))
    if spec["kind"] == "llama":
        return llama_cpp_runner(Path(spec["path"]), spec["max_seqs"], spec["max_len"], spec["max_tokens"], head)
    return ort_runner(Path(spec["path"]), spec.get("providers"), spec["head_dim"])


def worker(spec: dict) -> None:
    """One row in this process: print its median seconds per shape as JSON; with spec["samples"], also save
    its values on them to spec["values_out"]. Kind "quantize" quantizes a GGUF instead."""
    if spec["kind"] == "quantize":
        quantize_in_process(Path(spec["path"]), Path(spec["out"]), spec["type"])
        return
    head = score_head(Path(spec["model"])) if spec.get("model") else None
    run = make_runner(spec, head)
    shapes = [tuple(s) for s in spec["shapes"]]
    medians = time_calls(run, shapes, spec["reps"], spec["vocab"])
    if spec.get("samples"):
        samples = json.loads(Path(spec["samples"]).read_text())
        np.save(spec["values_out"], fidelity_values(run, samples, head))
    print(json.dumps([[list(s), t] for s, t in medians.items()]))


def measure(rows: dict[str, dict], shapes, reps: int, rounds: int, vocab: int,
            samples: Path | None = None) -> tuple[dict[str, dict[tuple, list[float]]], dict[str, np.ndarray]]:
    """Every row's per-round median seconds per shape, each row measured in a fresh process, the rows cycled
    ROUNDS times; and, when SAMPLES is given, every row's values on them (scored in the first round)."""
    times: dict[str, dict[tuple, list[float]]] = {name: {s: [] for s in shapes} for name in rows}
    values = {}
    for round_ in range(rounds):
        for i, (name, spec) in enumerate(rows.items()):
            spec = {**spec, "shapes": [list(s) for s in shapes], "reps": reps, "vocab": vocab}
            if samples is not None and round_ == 0:
                spec.update(samples=str(samples), values_out=str(samples.with_name(f"values_{i}.npy")))
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                  text=True, check=False)
            if done.returncode:
                raise SystemExit(f"row {name!r} failed: {done.stderr.strip().splitlines()[-1:]}")
            for shape, seconds in json.loads(done.stdout.strip().splitlines()[-1]):
                times[name][tuple(shape)].append(seconds)
            if "values_out" in spec:
                values[name] = np.load(spec["values_out"])
    return times, values


def print_table(times: dict[str, dict[tuple, list[float]]], shapes, reference: str,
                values: dict[str, np.ndarray] | None = None) -> None:
    """Ratio over REFERENCE (tokens/s) of the median round per shape, with the rounds' tokens/s range; the SQNR
    column when VALUES are given."""
    from vexport.parity import sqnr_db

    heads = [f"{b}x{t}" for b, t in shapes]
    sqnr = " SQNR vs reference |" if values else ""
    print(f"| row | {' | '.join(heads)} |{sqnr}")
    print("|---|" + "---|" * (len(heads) + bool(values)))
    for name, per in times.items():
        med = {s: statistics.median(per[s]) for s in shapes}
        ref = {s: statistics.median(times[reference][s]) for s in shapes}
        cells = [f"{ref[s] / med[s]:.2f}x ({s[0] * s[1] / med[s]:,.0f} tok/s; "
                 f"{s[0] * s[1] / max(per[s]):,.0f}-{s[0] * s[1] / min(per[s]):,.0f})" for s in shapes]
        if values:
            cells.append(f"{sqnr_db(values[reference], values[name]):.1f} dB" if name in values else "n/a")
        print(f"| {name} | {' | '.join(cells)} |")


def print_head_to_head(times: dict[str, dict[tuple, list[float]]], shapes) -> None:
    """Tokens/s ratio of each HEAD_TO_HEAD pair per shape: the median over rounds of the round's ratio, with the
    rounds' range, against the target."""
    pairs = [(a, b, target) for a, b, target in HEAD_TO_HEAD if a in times and b in times]
    if not pairs:
        return
    print(f"| ratio (same round; median, range over rounds) | {' | '.join(f'{b}x{t}' for b, t in shapes)} |")
    print("|---|" + "---|" * len(shapes))
    for a, b, target in pairs:
        cells = []
        for s in shapes:
            ratios = [tb / ta for ta, tb in zip(times[a][s], times[b][s])]
            verdict = "met" if statistics.median(ratios) >= target else "missed"
            cells.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}), {verdict}")
        print(f"| {a} / {b} (target >= {target}x) | {' | '.join(cells)} |")


def fidelity_samples(model: Path, work: Path) -> tuple[Path, int]:
    """The built-in prompt groups, rendered and encoded with MODEL's tokenizer, as a JSON list of token-id lists
    in WORK; and the longest sample's length."""
    from transformers import AutoTokenizer

    from vexport.evalset import builtin_prompt_groups, encode_groups

    samples = [list(s.input_ids) for s in encode_groups(AutoTokenizer.from_pretrained(model), builtin_prompt_groups())]
    path = work / "fidelity_samples.json"
    path.write_text(json.dumps(samples))
    return path, max(len(s) for s in samples)


def cuda_comparison(model: Path, work: Path, reps: int, rounds: int) -> None:
    """ONNX Runtime CUDA provider, fp16 optimized graph, against torch fp16 eager at 8x1024."""
    import onnxruntime as ort
    import torch

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
    print_table(measure(rows, shapes, reps, rounds, 49152)[0], shapes, "torch fp16 eager (cuda)")


def build_rows(args: argparse.Namespace, model: Path, gptq: Path, config: dict, max_len: int) -> dict[str, dict]:
    """Every row's worker spec, eager first; --rows keeps eager and the rows it names."""
    graphs = {**export_graphs(model, gptq, args.work), **({} if args.no_genai else genai_graphs(model, args.work))}
    ggufs = {} if args.no_llama_cpp else gguf_files(model, args.work, args.gguf_converter)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rows = {REFERENCE: {"kind": "torch", "path": str(model)}}
    rows.update({name: {"kind": "ort", "path": str(path), "head_dim": head_dim} for name, path in graphs.items()})
    longest = max(max_len, *(t for _, t in args.shapes))
    sizes = {"max_seqs": max(b for b, _ in args.shapes), "max_len": -(-longest // 256) * 256,
             "max_tokens": max(max_len, *(b * t for b, t in args.shapes))}
    rows.update({name: {"kind": "llama", "path": str(path), **sizes} for name, path in ggufs.items()})
    rows = {name: {**spec, "model": str(model)} for name, spec in rows.items()
            if name == REFERENCE or not args.rows or name in args.rows}
    return rows


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    model, gptq = prepare_models(args)
    print(f"model {model}; int4 graphs from {gptq}")
    config = json.loads((model / "config.json").read_text())
    samples, max_len = fidelity_samples(model, args.work)
    rows = build_rows(args, model, gptq, config, max_len)
    import onnxruntime

    print(f"CPU, {THREADS} threads, each row in its own process, {args.rounds} rounds of {args.reps} calls, "
          f"median of round medians; ratio = tokens/s over eager; load average before "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}; ONNX Runtime {onnxruntime.__version__}")
    if any(spec["kind"] == "llama" for spec in rows.values()):
        import llama_cpp

        print(f"llama.cpp rows: llama-cpp-python {llama_cpp.__version__}, per-token embeddings (pooling none, after "
              "the final norm) times the score head; a BxT call is one llama_decode batch of B sequences")
    print(f"SQNR: per-token values on the {len(json.loads(samples.read_text()))} built-in samples (each at batch 1) "
          "against transformers fp32 eager")
    times, values = measure(rows, args.shapes, args.reps, args.rounds, config["vocab_size"], samples)
    print_table(times, args.shapes, REFERENCE, values)
    print_head_to_head(times, args.shapes)
    print(f"load average after {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.cuda:
        cuda_comparison(model, args.work, args.reps, args.rounds)


if __name__ == "__main__":
    main()
