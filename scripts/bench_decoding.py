"""Value-guided decoding and best-of-n scoring: vexport sessions against recomputation and plain transformers.

All ratios come from this one run, on the trained SmolLM2-135M value model (float32 reference, loaded by
``vexport.load``: on CPU its decoder Linears run on oneDNN-packed weights, see vexport/backends/cpu_linear.py), with
``torch.set_num_threads(THREADS)``; methods are interleaved (each step, each repeat) so a busy machine slows
them alike, the fastest of several runs of each method counts (the least disturbed), and the values of every
method are checked against each other.

1. best-of-n: one prompt of 512 tokens, 8 responses of 64.
   - full: the 8 ``prompt + response`` sequences as one batch (``model.values``);
   - transformers, cache by hand: the prompt through the backbone with a ``DynamicCache``,
     ``batch_repeat_interleave(8)``, then the responses as one batch and the score head (on the same module as
     the two others, so the three differ in what they compute only);
   - vexport: ``model.score_group(prompt, responses)``.
2. value-guided steps: prompt 256, 4 candidate tokens a step, 32 steps (a fixed random choice each step).
   - re-run: ``prefix + candidate`` for the 4 candidates as one batch, every step;
   - transformers, cache copied: a plain transformers module (``from_pretrained``, nothing swapped), the prefix
     cache ``copy.deepcopy``-ed for each candidate, one forward of one token each, the chosen candidate's copy kept;
   - vexport: ``session.score(candidates)`` (one forward of the 4 tokens, tree attention) and
     ``session.advance(chosen)`` (its keys and values reused: no forward).
   The prompt's prefill is the same for the cached methods and is reported apart.

    python scripts/bench_decoding.py [--model DIR] [--threads 2] [--repeats 5] [--step-repeats 2] [--only PART]
                                     [--device cuda] [--smoke] [--json PATH] [--int4]

With --int4, vexport's methods run an RTN GPTQ int4 checkpoint of the model (group 128) through the int4
torch runtime (on CPU: packed int4 matmuls, backends/int4_cpu.py); the plain transformers rows stay float32.
scripts/bench_int4_cpu.py sets int4 beside float32 in one run.

Without --model it builds the trained value model (pip install 'vexport[trained]'). ``--smoke`` runs every
method once on a few tokens (the code paths and the value checks, no timing claims: its "smoke" key says so).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

import vexport


@dataclass(frozen=True)
class Workload:
    """The token counts of the two benchmarks (the defaults are the ones described above)."""

    prompt_group: int = 512
    responses: int = 8
    response_len: int = 64
    prompt_steps: int = 256
    candidates: int = 4
    steps: int = 32


SMOKE = Workload(prompt_group=24, responses=3, response_len=5, prompt_steps=12, candidates=3, steps=3)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def random_ids(generator: torch.Generator, vocab: int, *shape: int) -> torch.Tensor:
    return torch.randint(10, vocab, shape, generator=generator)


def hf_group(module, prompt: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """Plain transformers: prompt once into a DynamicCache, repeated for the batch, responses on top."""
    cache = DynamicCache(config=module.config)
    module.model(input_ids=prompt[None], cache=cache, use_cache=True)
    cache.batch_repeat_interleave(responses.shape[0])
    hidden = module.model(input_ids=responses, cache=cache, use_cache=True).last_hidden_state
    return module.score(hidden)[..., 0].float()


def bench_group(model, module, vocab: int, repeats: int, generator: torch.Generator, w: Workload) -> dict:
    device = model.device
    prompt = random_ids(generator, vocab, w.prompt_group).to(device)
    responses = random_ids(generator, vocab, w.responses, w.response_len).to(device)
    full_ids = torch.cat([prompt.expand(w.responses, -1), responses], dim=1)
    methods = {
        "full": lambda: model.values(full_ids)[:, w.prompt_group:],
        "transformers_cache": lambda: hf_group(module, prompt, responses),
        "vexport_score_group": lambda: torch.stack(model.score_group(prompt, responses)),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    outputs = {}
    with torch.inference_mode():
        for name, fn in methods.items():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in methods.items():
                seconds, outputs[name] = timed(fn, device)
                times[name].append(seconds)
    best = {name: min(t) for name, t in times.items()}
    return {
        "seconds_best": best,
        "seconds_each_run": times,
        "speedup_vs_full": best["full"] / best["vexport_score_group"],
        "transformers_cache_speedup_vs_full": best["full"] / best["transformers_cache"],
        "work_ratio": w.responses * (w.prompt_group + w.response_len) / (w.prompt_group + w.responses * w.response_len),
        "max_abs_diff_vs_full": max(float((outputs[n] - outputs["full"]).abs().max()) for n in methods),
    }


class CopyCacheScorer:
    """Plain transformers: the prefix cache copied for every candidate, one forward each."""

    def __init__(self, module, prompt: torch.Tensor):
        self.module = module
        self.cache = DynamicCache(config=module.config)
        module.model(input_ids=prompt[None], cache=self.cache, use_cache=True)
        self.copies: list = []

    def score(self, candidates: torch.Tensor) -> torch.Tensor:
        values, self.copies = [], []
        for token in candidates:
            cache = copy.deepcopy(self.cache)
            hidden = self.module.model(input_ids=token.view(1, 1), cache=cache, use_cache=True).last_hidden_state
            values.append(self.module.score(hidden)[0, -1, 0].float())
            self.copies.append(cache)
        return torch.stack(values)

    def advance(self, pick: int) -> None:
        self.cache = self.copies[pick]


def vexport_step(session, candidates: torch.Tensor, pick: int) -> torch.Tensor:
    values = session.score(candidates)
    session.advance(candidates[pick:pick + 1])
    return values


def run_steps(model, plain, prompt: torch.Tensor, candidates: torch.Tensor, picks: list[int]) -> dict:
    """One pass of the three methods over the same steps (interleaved per step; step 0 is a warm-up)."""
    device = model.device
    totals = {"rerun": 0.0, "transformers_copy": 0.0, "vexport_session": 0.0}
    prefill, diff = {}, 0.0
    prefill["transformers_copy"], copier = timed(lambda: CopyCacheScorer(plain, prompt), device)
    prefill["vexport_session"], session = timed(lambda: model.session(prompt), device)
    prefix = prompt
    for step, (cands, pick) in enumerate(zip(candidates, picks)):
        rerun_ids = torch.cat([prefix.expand(len(cands), -1), cands[:, None]], dim=1)
        seconds = {}
        seconds["rerun"], rerun = timed(lambda: model.values(rerun_ids)[:, -1], device)
        seconds["transformers_copy"], copied = timed(lambda: (copier.score(cands), copier.advance(pick))[0], device)
        seconds["vexport_session"], ours = timed(lambda: vexport_step(session, cands, pick), device)
        diff = max(diff, float((ours - rerun).abs().max()), float((copied - rerun).abs().max()))
        prefix = torch.cat([prefix, cands[pick:pick + 1]])
        for name, value in seconds.items():
            totals[name] += value if step else 0.0
    return {"totals": totals, "prefill": prefill, "max_abs_diff": diff}


def bench_steps(model, plain, vocab: int, repeats: int, generator: torch.Generator, w: Workload) -> dict:
    device = model.device
    prompt = random_ids(generator, vocab, w.prompt_steps).to(device)
    candidates = random_ids(generator, vocab, w.steps + 1, w.candidates).to(device)
    picks = torch.randint(0, w.candidates, (w.steps + 1,), generator=generator).tolist()
    with torch.inference_mode():
        runs = [run_steps(model, plain, prompt, candidates, picks) for _ in range(repeats)]
    best = {name: min(run["totals"][name] for run in runs) for name in runs[0]["totals"]}
    prefill = min(run["prefill"]["vexport_session"] for run in runs)
    ours = best["vexport_session"]
    return {
        "seconds_for_steps_best": best,
        "seconds_for_steps_each_run": [run["totals"] for run in runs],
        "prefill_seconds_each_run": [run["prefill"] for run in runs],
        "speedup_vs_rerun": best["rerun"] / ours,
        "speedup_vs_transformers_copy": best["transformers_copy"] / ours,
        "speedup_vs_rerun_with_prefill": best["rerun"] / (ours + prefill),
        "max_abs_diff": max(run["max_abs_diff"] for run in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a value model folder (default: build the trained SmolLM2 one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="best-of-n runs (the fastest of each method counts)")
    parser.add_argument("--step-repeats", type=int, default=2, help="passes over the 32 steps (the fastest counts)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=["best_of_n", "value_guided_steps"], help="run one of the two")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="one run of each method: code paths, no timing claims")
    parser.add_argument("--int4", action="store_true", help="vexport's methods on an RTN GPTQ int4 checkpoint")
    args = parser.parse_args()
    workload = SMOKE if args.smoke else Workload()
    if args.smoke:
        args.repeats = args.step_repeats = 1
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            from vexport.trained import make_trained_value_model

            folder = make_trained_value_model(Path(tmp) / "trained")
        if args.int4:
            from vexport.export.rtn import write_rtn_checkpoint

            model = vexport.load(write_rtn_checkpoint(folder, Path(tmp) / "int4", group_size=128), device=args.device)
        else:
            model = vexport.load(folder, device=args.device, dtype="float32")
        module = model.runner.module
        load_before = os.getloadavg()
        results = {"model": str(folder), "device": str(model.device), "threads": args.threads, "smoke": args.smoke,
                   "int4": args.int4}
        vocab = model.config.vocab_size
        if args.only in (None, "best_of_n"):
            results["best_of_n"] = bench_group(model, module, vocab, args.repeats, torch.Generator().manual_seed(0),
                                               workload)
        if args.only in (None, "value_guided_steps"):
            from transformers import AutoModelForTokenClassification

            plain = AutoModelForTokenClassification.from_pretrained(folder, dtype=torch.float32).to(args.device).eval()
            results["value_guided_steps"] = bench_steps(model, plain, vocab, args.step_repeats,
                                                        torch.Generator().manual_seed(1), workload)
        results["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
