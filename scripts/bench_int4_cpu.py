"""The int4 torch runtime on CPU: packed int4 matmul vs dequantized int4 vs the float32 reference, one run.

Methods on the trained SmolLM2-135M value model (or --model), ``torch.set_num_threads(THREADS)``:
- ``float32``: ``vexport.load`` of the float model (its Linears on oneDNN-packed weights, backends/cpu_linear.py);
- ``int4_packed``: ``vexport.load`` of an RTN GPTQ v1 checkpoint of it (group --group-size, act-order with
  --desc-act), its Linears on torch's packed int4 CPU matmul (backends/int4_cpu.py, bfloat16 compute), float32
  activations (the default);
- ``int4_packed_bf16``: the same with ``dtype="bfloat16"`` (bfloat16 activations: no cast around each matmul);
- ``int4_bf16_prefill``: that plus ``cpu_prefill="bfloat16"`` (calls of 8 rows or more on oneDNN bfloat16
  copies of the weights, 2 more bytes per weight; fewer rows keep the int4 op);
- ``int4_dequantized``: the default folder inside ``dequantized_linears`` (dequantize + float matmul).
Two workloads: prefill of 1×64 tokens (``model.values``), and value-guided steps (a 256-token prompt, then
``session.score`` of 4 candidate tokens and ``session.advance`` of one, STEPS steps). Methods are interleaved
at each repeat / step so a busy machine slows them alike; the fastest repeat counts. Speed does not depend
on how the int4 weights were found, so RTN stands in for GPTQ here. ``--sweep`` adds the row sweep behind
``int4_cpu.DENSE_MIN_ROWS``: one hidden -> intermediate Linear, the int4 op against oneDNN bfloat16 and float32.

    python scripts/bench_int4_cpu.py [--model DIR] [--threads 2] [--repeats 10] [--steps 16] [--desc-act] [--sweep]
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


def methods(fp, int4, int4_bf16, int4_prefill) -> dict:
    """name -> (model, context manager factory) for each method."""
    return {
        "float32": (fp, contextlib.nullcontext),
        "int4_packed": (int4, contextlib.nullcontext),
        "int4_packed_bf16": (int4_bf16, contextlib.nullcontext),
        "int4_bf16_prefill": (int4_prefill, contextlib.nullcontext),
        "int4_dequantized": (int4, lambda: dequantized_linears(int4.runner.module)),
    }


def weight_bytes(model) -> int:
    """Bytes of the decoder Linears' weights as the method holds them (int4 codes, scales, bfloat16 copies)."""
    from vexport.backends.cpu_linear import PackedLinear
    from vexport.backends.gptq import QuantLinear

    total = 0
    for m in model.runner.module.modules():
        if isinstance(m, QuantLinear) and m.cpu_int4 is not None:
            packed = m.cpu_int4
            total += packed.weight.nbytes + packed.scale_and_zeros.nbytes
            total += packed.dense.to_dense().nbytes if packed.dense is not None else 0
        elif isinstance(m, PackedLinear):
            total += m.in_features * m.out_features * 4
    return total


def sweep(hidden: int, intermediate: int, group: int, repeats: int) -> dict:
    """ms per call of one [hidden -> intermediate] Linear at 1..256 rows: int4 op, oneDNN bf16, oneDNN fp32."""
    from vexport.backends import int4_cpu

    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (hidden, intermediate), generator=gen, dtype=torch.int32)
    groups = -(-hidden // group)  # a shorter last group where GROUP does not divide HIDDEN
    zeros = torch.randint(0, 16, (groups, intermediate), generator=gen, dtype=torch.int32)
    scales = torch.rand(groups, intermediate, generator=gen) / 64
    g_idx = torch.arange(hidden, dtype=torch.int32) // group
    dense = ((codes - zeros[g_idx.long()]) * scales[g_idx.long()]).T.contiguous()
    packed = int4_cpu.pack_for_cpu(codes, zeros, scales, g_idx, dense)
    int4_only = int4_cpu.PackedInt4(packed.weight, packed.scale_and_zeros, packed.group_size, packed.perm)
    fp32 = torch.ops.mkldnn._reorder_linear_weight(dense, 1024)
    calls = {
        "int4_op": lambda x: int4_cpu.int4_linear(x, int4_only, None),
        "onednn_bf16": lambda x: torch.ops.mkldnn._linear_pointwise(x.bfloat16(), packed.dense, None, "none", [], ""),
        "onednn_fp32": lambda x: torch.ops.mkldnn._linear_pointwise(x, fp32, None, "none", [], ""),
    }
    table = {}
    for rows in (1, 2, 4, 8, 16, 32, 64, 256):
        x = torch.randn(rows, hidden, generator=gen)
        times = {name: [] for name in calls}
        for repeat in range(repeats + 1):
            for name, call in calls.items():
                seconds, _ = timed(lambda: call(x))
                if repeat:
                    times[name].append(seconds)
        table[rows] = {name: round(min(t) * 1e3, 4) for name, t in times.items()}
    return {"linear": f"{hidden} -> {intermediate}, group {group}", "ms_per_call": table}


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
    parser.add_argument("--sweep", action="store_true", help="add the row sweep behind int4_cpu.DENSE_MIN_ROWS")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        folder = args.model
        if folder is None:
            from vexport.trained import make_trained_value_model

            folder = make_trained_value_model(Path(tmp) / "trained")
        int4_dir = write_rtn_checkpoint(folder, Path(tmp) / "int4", group_size=args.group_size, desc_act=args.desc_act)
        fp, int4 = vexport.load(folder, device="cpu", dtype="float32"), vexport.load(int4_dir, device="cpu")
        int4_bf16 = vexport.load(int4_dir, device="cpu", dtype="bfloat16")
        int4_prefill = vexport.load(int4_dir, device="cpu", dtype="bfloat16", cpu_prefill="bfloat16")
        runs = methods(fp, int4, int4_bf16, int4_prefill)
        held = {name: weight_bytes(model) for name, (model, _) in runs.items() if name != "int4_dequantized"}
        load_before = os.getloadavg()[0]
        prefill = bench_prefill(runs, fp.config.vocab_size, args.repeats)
        steps = bench_steps(runs, fp.config.vocab_size, args.steps)
        swept = sweep(fp.config.hidden_size, fp.config.intermediate_size, args.group_size, args.repeats) \
            if args.sweep else None
    tps, sps = prefill["tokens_per_s"], steps["steps_per_s"]
    results = {
        "model": str(folder), "threads": args.threads, "group_size": args.group_size, "desc_act": args.desc_act,
        "prefill_1x64_tokens_per_s": tps,
        "value_guided_steps_per_s": sps,
        "ratios_vs_float32": {
            "prefill": {name: tps[name] / tps["float32"] for name in runs if name != "float32"},
            "steps": {name: sps[name] / sps["float32"] for name in runs if name != "float32"},
        },
        "ratios_packed_vs_dequantized": {"prefill": tps["int4_packed"] / tps["int4_dequantized"],
                                         "steps": sps["int4_packed"] / sps["int4_dequantized"]},
        "decoder_linear_weight_mb": {name: round(b / 2**20, 3) for name, b in held.items()},
        "max_abs_diff_packed_vs_dequantized": {
            "prefill": max_diff(prefill["values"], "int4_packed", "int4_dequantized"),
            "steps": max_diff(steps["values"], "int4_packed", "int4_dequantized"),
        },
        "max_abs_diff_int4_vs_float32_prefill": max_diff(prefill["values"], "int4_dequantized", "float32"),
        "sqnr_db_prefill": {  # each fast path's bfloat16 error beside the int4 quantization error
            **{f"{name}_vs_dequantized": sqnr(prefill["values"], "int4_dequantized", name)
               for name in ("int4_packed", "int4_packed_bf16", "int4_bf16_prefill")},
            "dequantized_vs_float32": sqnr(prefill["values"], "float32", "int4_dequantized"),
        },
        "sqnr_db_steps_vs_dequantized": {name: sqnr(steps["values"], "int4_dequantized", name)
                                         for name in ("int4_packed", "int4_packed_bf16", "int4_bf16_prefill")},
        "row_sweep": swept,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
