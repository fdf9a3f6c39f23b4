"""How long a small request waits behind a large one in flight on `vexport serve` (loopback, one run).

Builds a random value model (hidden 256, 4 layers; or takes --model), starts `vexport serve --batch-tokens
BATCH_TOKENS` as a subprocess on 127.0.0.1 and a free port, and measures, REPEATS times each:

1. a small request (one sequence of 16 tokens, /v1/values) alone;
2. the same small request sent 0.3 s after a large one: /v1/values with LARGE_ROWS sequences of 512
   tokens, then /v1/groups with a prompt of 64 and LARGE_ROWS responses of 448;

and prints the medians, the large request's own time, and the ratio small-wait / large-time (the server's
policy: a flush takes at most --batch-tokens tokens of any one request and a group runs in --batch-tokens
chunks, so the small one waits for about one batch, not for the whole large request).

    python scripts/bench_serve_fairness.py [--large-rows 16] [--batch-tokens 1024] [--repeats 3] [--model DIR]
                                           [--max-seconds 300]

Bounded: a fixed number of requests, loopback only, the whole run stops at --max-seconds.
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

URL_LINE = re.compile(r"serving .* on (http://127\.0\.0\.1:\d+) ")
SMALL = {"input_ids": [[5 + i for i in range(16)]]}


def build_model(folder: Path) -> Path:
    from vexport.tiny import make_tiny_value_model

    return make_tiny_value_model(folder, seed=4, hidden_size=256, num_layers=4, num_heads=8,
                                 max_position_embeddings=1024)


def start_server(model: Path, batch_tokens: int, log: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "vexport", "serve", str(model), "--port", "0",
                                "--batch-tokens", str(batch_tokens), "--max-length", "512"],
                               stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    for line in process.stdout:
        if match := URL_LINE.search(line):
            url = match.group(1)
            break
    else:
        raise SystemExit(f"vexport serve did not start; see {log}")
    while httpx.get(f"{url}/ready", timeout=5).status_code != 200:
        time.sleep(0.1)
    return process, url


def timed(http: httpx.Client, path: str, body: dict) -> float:
    start = time.perf_counter()
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return time.perf_counter() - start


def behind(url: str, path: str, large: dict) -> tuple[float, float]:
    """(the small request's seconds, the large one's) with the small one sent once the large one runs."""
    large_s: list[float] = []
    with httpx.Client(base_url=url, timeout=600) as http:
        thread = threading.Thread(target=lambda: large_s.append(timed(http, path, large)))
        thread.start()
        time.sleep(0.3)  # the large one is queued and running (it takes seconds)
        assert thread.is_alive(), "the large request was done before the small one went: make it larger"
        small_s = timed(http, "/v1/values", SMALL)
        thread.join()
    return small_s, large_s[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--large-rows", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--max-seconds", type=float, default=300)
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, lambda *_: sys.exit(f"stopped after --max-seconds {args.max_seconds:g}"))
    signal.alarm(int(args.max_seconds))
    work = Path(tempfile.mkdtemp(prefix="bench-fairness-"))
    model = args.model or build_model(work / "model")
    process, url = start_server(model, args.batch_tokens, work / "server.log")
    rows = [[5 + (i * 7 + j) % 900 for j in range(512)] for i in range(args.large_rows)]
    cases = {"/v1/values": {"input_ids": rows, "per_token": False},
             "/v1/groups": {"prompt_ids": rows[0][:64], "response_ids": [r[:448] for r in rows], "per_token": False}}
    try:
        with httpx.Client(base_url=url, timeout=600) as http:
            timed(http, "/v1/values", SMALL)
            alone = statistics.median(timed(http, "/v1/values", SMALL) for _ in range(args.repeats))
        figures = {path: [behind(url, path, body) for _ in range(args.repeats)] for path, body in cases.items()}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    print(f"--batch-tokens {args.batch_tokens}; large: {args.large_rows} x 512 tokens; median of {args.repeats}")
    print(f"  small request alone                      {alone * 1000:8.1f} ms")
    for path, runs in figures.items():
        small = statistics.median(s for s, _ in runs)
        large = statistics.median(g for _, g in runs)
        print(f"  small request behind a large {path:11s} {small * 1000:8.1f} ms; the large one took "
              f"{large * 1000:8.1f} ms; small wait / large time {small / large:.2f}")


if __name__ == "__main__":
    main()
