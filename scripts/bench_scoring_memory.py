"""Peak memory of the local scoring engine at 10,000 and at 100,000 rows: it should not grow with the rows.

Builds the tiny value model and a JSONL file of short mixed-length rows (plain texts, prompt/response pairs and
chats, 1 to 24 words), then scores the first 10,000 rows and all 100,000 rows, each in a fresh child process,
and prints each child's peak RSS (VmHWM) and the ratio, measured in this one run.

    python scripts/bench_scoring_memory.py [--rows 10000 100000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# VmHWM is the high-water mark of the child's own address space (ru_maxrss would carry the parent's RSS over fork).
CHILD = """
import json, sys
from vexport.scoring import score
summary = score(sys.argv[1], sys.argv[2], sys.argv[3], force=True)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"peak_rss": int(hwm.split()[1]) * 1024, "rows": summary["rows_read"], "tokens": summary["tokens"],
                  "seconds": summary["this_run"]["seconds"]}))
"""
WORDS = ("the", "cat", "sat", "on", "a", "warm", "mat", "while", "rain", "fell", "over", "quiet", "city", "and",
         "every", "student", "answered", "question", "about", "rivers", "mountains", "bread", "is", "good")


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(rows):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 24)))
            kind = i % 4
            row = ({"text": text} if kind < 2 else {"prompt": "Say something.", "response": text} if kind == 2 else
                   {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": text}]})
            fh.write(json.dumps({"id": i, **row}) + "\n")


def peak(model: Path, data: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(model), str(data), str(out)], capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from vexport.tiny import make_tiny_value_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vexport-bench-scoring-memory-"))
    model = make_tiny_value_model(work / "tiny", seed=0)
    results = []
    for rows in args.rows:
        write_rows(work / f"rows-{rows}.jsonl", rows)
        start = time.perf_counter()
        r = peak(model, work / f"rows-{rows}.jsonl", work / f"out-{rows}")
        r["wall"] = time.perf_counter() - start
        results.append(r)
        print(f"{r['rows']:>8} rows  {r['tokens']:>9} tokens  peak RSS {r['peak_rss'] / 2**20:7.1f} MiB  "
              f"scoring {r['seconds']:.0f} s")
    ratio = results[-1]["peak_rss"] / results[0]["peak_rss"]
    print(f"peak RSS at {results[-1]['rows']} rows / at {results[0]['rows']} rows: {ratio:.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
