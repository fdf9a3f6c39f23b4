"""The int4 torch runtime on CPU: packed int4 matmul vs dequantized int4 vs the float32 reference, one run.

Three methods on the trained SmolLM2-135M value model (or --model), ``torch.set_num_threads(THREADS)``:
- ``float32``: ``vexport.load`` of the float model (its Linears on oneDNN-packed weights, backends/cpu_linear.py);
- ``int4_packed``: ``vexport.load`` of an RTN GPTQ v1 checkpoint of it (group --group-size, act-order with
  --desc-act), its Linears on torch's packed int4 CPU matmul (backends/int4_cpu.py, bfloat16 compute);
- ``int4_dequantized``: the same loaded folder inside ``dequantized_linears`` (dequantize + float matmul).
Two workloads: prefill of 1×64 tokens (``model.values``), and value-guided steps (a 256-token prompt, then
``session.score`` of 4 candidate tokens and ``session.advance`` of one, STEPS steps). Methods are interleaved
at each repeat / step so a busy machine slows them alike; the fastest repeat counts. Speed does not depend
on how the int4 weights were found, so RTN stands in for GPTQ here.

    python scripts/bench_int4_cpu.py [--model DIR] [--threads 2] [--repeats 10] [--steps 16] [--desc-act]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import vexport
from vexport.backends.gptq import dequantized_linears
from vexport.export.rtn import write_rtn_checkpoint
from vexport.parity import sqnr_db

PREFILL, PROMPT, CANDIDATES = 64, 256, 4


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def methods(fp, int4) -> dict:
    """name -> (model, context manager factory) for each method."""
    return {
        "float32": (fp, contextlib.nullcontext),
        "int4_packed": (int4, contextlib.nullcontext),
        "int4_dequantized": (int4, lambda: dequantized_linears(int4.runner.module)),
    }


def bench_prefill(runs: dict, vocab: int, repeats: int) -> dict:
    ids = torch.randint(10, vocab, (1, PREFILL), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in runs}
    out = {}
    for repeat in range(repeats + 1):  # repeat 0 is a warm-up
        for name, (model, context) in runs.items():
            with context():
                seconds, out[name] = timed(lambda: model.values(ids))
            if repeat:
                times[name].append(seconds)
    best = {name: min(t) for name, t in times.items()}
    return {"tokens_per_s": {name: PREFILL / s for name, s in best.items()}, "values": out}


def step_once(session, candidates: torch.Tensor, pick: int) -> torch.Tensor:
    values = session.score(candidates)
    session.advance(candidates[pick:pick + 1])
    return values


def bench_steps(runs: dict, vocab: int, steps: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, vocab, (PROMPT,), generator=gen)
    candidates = torch.randint(10, vocab, (steps + 1, CANDIDATES), generator=gen)
    picks = torch.randint(0, CANDIDATES, (steps + 1,), generator=gen).tolist()
    sessions = {}
    for name, (model, context) in runs.items():
        with context():
            sessions[name] = model.session(prompt)
    totals = {name: 0.0 for name in runs}
    values = {name: [] for name in runs}
    for step, (cands, pick) in enumerate(zip(candidates, picks)):
        for name, (_, context) in runs.items():
            with context():
                seconds, got = timed(lambda: step_once(sessions[name], cands, pick))
            totals[name] += seconds if step else 0.0  # step 0 is a warm-up
            values[name].append(got)
    return {"steps_per_s": {name: steps / s for name, s in totals.items()},
            "values": {name: torch.stack(v) for name, v in values.items()}}


def max_diff(values: dict, a: str, b: str) -> float:
    return float((values[a] - values[b]).abs().max())


def sqnr(values: dict, reference: str, candidate: str) -> float:
    return sqnr_db(values[reference].flatten().numpy(), values[candidate].flatten().numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a value model folder (default: build the trained SmolLM2 one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--desc-act", action="store_true", help="an act-order checkpoint (columns permuted)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        folder = args.model
        if folder is None:
            from vexport.trained import make_trained_value_model

            folder = make_trained_value_model(Path(tmp) / "trained")
        int4_dir = write_rtn_checkpoint(folder, Path(tmp) / "int4", group_size=args.group_size, desc_act=args.desc_act)
        fp, int4 = vexport.load(folder, device="cpu", dtype="float32"), vexport.load(int4_dir, device="cpu")
        runs = methods(fp, int4)
        load_before = os.getloadavg()[0]
        prefill = bench_prefill(runs, fp.config.vocab_size, args.repeats)
        steps = bench_steps(runs, fp.config.vocab_size, args.steps)
    tps, sps = prefill["tokens_per_s"], steps["steps_per_s"]
    results = {
        "model": str(folder), "threads": args.threads, "group_size": args.group_size, "desc_act": args.desc_act,
        "prefill_1x64_tokens_per_s": tps,
        "value_guided_steps_per_s": sps,
        "ratios": {
            "prefill_packed_vs_float32": tps["int4_packed"] / tps["float32"],
            "prefill_packed_vs_dequantized": tps["int4_packed"] / tps["int4_dequantized"],
            "steps_packed_vs_float32": sps["int4_packed"] / sps["float32"],
            "steps_packed_vs_dequantized": sps["int4_packed"] / sps["int4_dequantized"],
        },
        "max_abs_diff_packed_vs_dequantized": {
            "prefill": max_diff(prefill["values"], "int4_packed", "int4_dequantized"),
            "steps": max_diff(steps["values"], "int4_packed", "int4_dequantized"),
        },
        "max_abs_diff_int4_vs_float32_prefill": max_diff(prefill["values"], "int4_dequantized", "float32"),
        "sqnr_db_prefill": {  # the packed path's bfloat16 error beside the int4 quantization error
            "packed_vs_dequantized": sqnr(prefill["values"], "int4_dequantized", "int4_packed"),
            "dequantized_vs_float32": sqnr(prefill["values"], "float32", "int4_dequantized"),
            "packed_vs_float32": sqnr(prefill["values"], "float32", "int4_packed"),
        },
        "load_average_before_after": [load_before, os.getloadavg()[0]],
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
