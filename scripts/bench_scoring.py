"""Scoring throughput: token-budget batches against fixed batches of 16 rows, and 2 Ray workers against 1.

Builds a random value model (hidden 256, 4 layers, 2048 positions) and a mixed-length set whose rows are
spread evenly from 16 to 1024 tokens, then, in this one run:

1. scores the set with the local engine twice: batches cut by token budget after sorting by length (the
   default), and fixed batches of 16 rows in input order; prints tokens/s of each and the ratio;
2. starts a local Ray instance with 2 CPUs and scores the set with 1 and with 2 CPU workers of one thread
   each; prints tokens/s of each (wall time of the whole run, actor start-up included) and the ratio.

    python scripts/bench_scoring.py [--rows 256] [--ray-rows 512] [--skip-batching] [--skip-ray] [--workdir DIR]

Both ratios need the CPUs to themselves: on a machine shared with other work they mean little.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path


def build_model(folder: Path) -> Path:
    from vexport.tiny import make_tiny_value_model

    return make_tiny_value_model(folder, seed=3, hidden_size=256, num_layers=4, num_heads=8,
                                 max_position_embeddings=2048)


def mixed_length_set(model: Path, path: Path, rows: int, seed: int = 0) -> list[int]:
    """ROWS plain-text rows, in random order, whose token counts are spread evenly from 16 to 1024."""
    from transformers import AutoTokenizer

    from vexport.tiny import tiny_corpus

    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)
    source = " ".join(rng.choice(tiny_corpus()) for _ in range(2000))
    offsets = tokenizer(source, return_offsets_mapping=True)["offset_mapping"]
    targets = [16 + (1024 - 16) * i // max(1, rows - 1) for i in range(rows)]
    rng.shuffle(targets)  # in input order, fixed-size batches mix short and long rows
    lengths = []
    with open(path, "w") as fh:
        for i, target in enumerate(targets):
            start = rng.randrange(1, len(offsets) - target)
            text = source[offsets[start][0]:offsets[start + target - 2][1]]  # target - 1 tokens, then bos
            fh.write(json.dumps({"id": i, "text": text}) + "\n")
            lengths.append(len(tokenizer(text)["input_ids"]))
    return lengths


def batching(model: Path, data: Path, work: Path, part_rows: int) -> dict:
    from vexport.scoring import score

    budget = score(model, data, work / "budget", part_rows=part_rows, batch_tokens=16384, force=True)
    fixed = score(model, data, work / "fixed16", part_rows=part_rows, fixed_batch_rows=16, force=True)
    return {name: {"tokens_per_s": s["this_run"]["tokens_per_s"], "seconds": s["this_run"]["seconds"],
                   "padding_fraction": s["padding_fraction"], "tokens": s["tokens"]}
            for name, s in (("token_budget", budget), ("fixed_16_rows", fixed))}


def ray_workers(model: Path, data: Path, work: Path, part_rows: int) -> dict:
    import logging

    import ray

    from vexport.scoring import score

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        results = {}
        for workers in (1, 2):
            s = score(model, data, work / f"ray-{workers}", part_rows=part_rows, engine="ray", workers=workers,
                      threads=1, force=True)
            results[f"{workers}_workers"] = {"tokens_per_s": s["this_run"]["tokens_per_s"],
                                             "seconds": s["this_run"]["seconds"], "tokens": s["tokens"]}
        return results
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--part-rows", type=int, default=256, help="rows per window for the batching comparison")
    parser.add_argument("--ray-rows", type=int, default=512, help="rows for the Ray comparison (start-up is in it)")
    parser.add_argument("--ray-part-rows", type=int, default=16, help="rows per window for the Ray comparison")
    parser.add_argument("--skip-batching", action="store_true")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vexport-bench-scoring-"))
    model = build_model(work / "model")
    lengths = mixed_length_set(model, work / "mixed.jsonl", args.rows)
    print(f"mixed-length set: {len(lengths)} rows, {sum(lengths)} tokens, lengths {min(lengths)}..{max(lengths)} "
          f"(mean {sum(lengths) / len(lengths):.0f}); model hidden 256, 4 layers")
    results = {}
    if not args.skip_batching:
        results["batching"] = b = batching(model, work / "mixed.jsonl", work, args.part_rows)
        for name, r in b.items():
            print(f"{name:14} {r['tokens_per_s']:9.0f} tokens/s  padding {r['padding_fraction']:.2f}  "
                  f"{r['seconds']:.1f} s")
        results["batching_ratio"] = b["token_budget"]["tokens_per_s"] / b["fixed_16_rows"]["tokens_per_s"]
        print(f"token-budget / fixed-16 tokens/s: {results['batching_ratio']:.2f}x")
    if not args.skip_ray:
        ray_lengths = mixed_length_set(model, work / "mixed-ray.jsonl", args.ray_rows, seed=1)
        print(f"Ray set: {len(ray_lengths)} rows, {sum(ray_lengths)} tokens; a local Ray instance with 2 CPUs")
        results["ray"] = ray_workers(model, work / "mixed-ray.jsonl", work, args.ray_part_rows)
        for name, r in results["ray"].items():
            print(f"ray {name:10} {r['tokens_per_s']:9.0f} tokens/s  {r['seconds']:.1f} s (one thread per worker)")
        results["ray_ratio"] = results["ray"]["2_workers"]["tokens_per_s"] / results["ray"]["1_workers"]["tokens_per_s"]
        print(f"2 workers / 1 worker tokens/s: {results['ray_ratio']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
