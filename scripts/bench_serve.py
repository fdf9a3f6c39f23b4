"""`vexport serve` load test on loopback: throughput against offline `vexport score`, latency, shared-prompt groups.

Builds a random value model (hidden 256, 4 layers, 1024 positions; or takes --model) and ROWS plain-text rows
spread evenly from 16 to 512 tokens, starts `vexport serve` as a subprocess on 127.0.0.1 and a free port, and
prints, in this one run:

1. throughput, in 3 alternating rounds (--rounds): the rows scored offline by `vexport score` (the Python verb,
   one process; its tokens/s with the model load taken out, measured on a one-row run), then the server at
   saturation (64 concurrent clients, one row per request, every row once) on /v1/values, then on OpenRLHF's
   /get_reward; each round's server/offline ratio, and their median and range (goal >= 0.8);
2. latency p50 / p99 of one-row requests at 1 client (LATENCY_REQUESTS sequential) and at 64 concurrent
   clients (max(128, LATENCY_REQUESTS) requests: at 64 clients the server is saturated, so this is queueing);
3. /v1/groups (one prompt of 512 tokens, 8 responses of 64) against the same 8 sequences (prompt + response)
   sent as 8 concurrent independent /v1/values requests, GROUP_REPEATS times each, and the ratio (goal >= 3).

    python scripts/bench_serve.py [--rows 256] [--rounds 3] [--latency-requests 128] [--group-repeats 5] [--model DIR]
                                  [--max-seconds 900] [--workdir DIR] [--device cpu|cuda] [--json PATH] [--smoke]

--smoke (the GPU suite's CPU rehearsal) runs every part on 16 rows and a handful of requests: no figures to read.

Bounded: a fixed number of requests, loopback only, and the whole run stops at --max-seconds. The client
runs on the same CPUs as the server: on a shared machine the figures mean little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

URL_LINE = re.compile(r"serving .* on (http://127\.0\.0\.1:\d+) ")


def build_model(folder: Path) -> Path:
    from vexport.tiny import make_tiny_value_model

    return make_tiny_value_model(folder, seed=4, hidden_size=256, num_layers=4, num_heads=8,
                                 max_position_embeddings=1024)


def make_rows(model: Path, rows: int, seed: int = 0) -> list[str]:
    """ROWS texts whose token counts are spread evenly from 16 to 512, in random order."""
    from transformers import AutoTokenizer

    from vexport.tiny import tiny_corpus

    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)
    source = " ".join(rng.choice(tiny_corpus()) for _ in range(1500))
    offsets = tokenizer(source, return_offsets_mapping=True)["offset_mapping"]
    targets = [16 + (512 - 16) * i // max(1, rows - 1) for i in range(rows)]
    rng.shuffle(targets)
    texts = []
    for target in targets:
        start = rng.randrange(1, len(offsets) - target)
        texts.append(source[offsets[start][0]:offsets[start + target - 2][1]])  # target - 1 tokens, then bos
    return texts


def offline(model: Path, texts: list[str], work: Path, device: str | None = None) -> dict:
    from vexport.scoring import score

    def run(name: str, rows: list[str]) -> dict:
        data = work / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        return score(model, data, work / name, force=True, device=device)["this_run"]

    run("warm", texts[:4])
    one, full = run("one", texts[:1]), run("all", texts)
    seconds = max(full["seconds"] - one["seconds"], 1e-6)  # the model load (and one row) taken out
    return {"tokens": full["tokens"], "seconds_with_load": full["seconds"], "tokens_per_s": full["tokens"] / seconds,
            "tokens_per_s_with_load": full["tokens_per_s"]}


class Server:
    def __init__(self, model: Path, log: Path, device: str | None = None):
        self.log = open(log, "w")
        extra = ["--device", device] if device else []
        self.process = subprocess.Popen([sys.executable, "-m", "vexport", "serve", str(model), "--port", "0", *extra],
                                        stdout=subprocess.PIPE, stderr=self.log, text=True)
        for line in self.process.stdout:
            if match := URL_LINE.search(line):
                self.url = match.group(1)
                break
        else:
            raise SystemExit(f"vexport serve did not start; see {log}")
        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"vexport serve never became ready; see {log}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


async def requests(url: str, payloads: list[tuple[str, dict]], clients: int) -> tuple[float, list[float]]:
    """Send every payload with CLIENTS concurrent connections; wall seconds and each request's latency."""
    queue = list(reversed(payloads))
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient):
        while queue:
            path, body = queue.pop()
            start = time.perf_counter()
            response = await http.post(path, json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - start, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_row(path: str, text: str) -> dict:
    """The request body of one row: /v1/values' last-token value, or OpenRLHF's reward call."""
    return {"query": [text]} if path == "/get_reward" else {"texts": [text], "per_token": False}


def saturation(url: str, texts: list[str], path: str = "/v1/values", warm: bool = True) -> dict:
    """Every row once, one row per request, from 64 concurrent clients, to PATH."""
    if warm:
        asyncio.run(requests(url, [(path, one_row(path, t)) for t in texts[:64]], 64))
    if path == "/get_reward":
        counted = httpx.post(f"{url}{path}", json={"query": texts}, timeout=300).json()["extra_logs"]
    else:
        counted = httpx.post(f"{url}{path}", json={"texts": texts, "per_token": False}, timeout=300).json()
    tokens = sum(counted["num_tokens"])
    seconds, _ = asyncio.run(requests(url, [(path, one_row(path, t)) for t in texts], 64))
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def rounds(model: Path, url: str, texts: list[str], work: Path, device: str | None, count: int = 3) -> list[dict]:
    """COUNT rounds, each offline `vexport score`, then the server on /v1/values, then on /get_reward: the load
    of a shared machine changes between rounds, so each ratio is taken within one round."""
    out = []
    for index in range(count):
        base = offline(model, texts, work, device)
        values = saturation(url, texts, "/v1/values", warm=index == 0)
        reward = saturation(url, texts, "/get_reward", warm=index == 0)
        out.append({"offline": base, "values": values, "get_reward": reward,
                    "values_ratio": values["tokens_per_s"] / base["tokens_per_s"],
                    "get_reward_ratio": reward["tokens_per_s"] / base["tokens_per_s"]})
    return out


def spread(ratios: list[float]) -> str:
    return (f"median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}x-{max(ratios):.2f}x "
            f"(spread {max(ratios) / min(ratios):.2f})")


def latency(url: str, texts: list[str], count: int, smoke: bool = False) -> dict:
    out = {}
    for clients, total in ((1, count), (64, count if smoke else max(128, count))):
        payloads = [("/v1/values", {"texts": [texts[i % len(texts)]], "per_token": False}) for i in range(total)]
        _, times = asyncio.run(requests(url, payloads, clients))
        out[clients] = {"requests": total, "p50_ms": 1000 * statistics.median(times),
                        "p99_ms": 1000 * percentile(times, 0.99)}
    return out


def groups(url: str, repeats: int, vocab: int = 1000) -> dict:
    rng = random.Random(1)
    prompt = [1] + [rng.randrange(5, vocab) for _ in range(511)]
    responses = [[rng.randrange(5, vocab) for _ in range(64)] for _ in range(8)]
    group = [("/v1/groups", {"prompt_ids": prompt, "response_ids": responses})]
    alone = [("/v1/values", {"input_ids": [prompt + r], "prompt_lengths": [512]}) for r in responses]
    asyncio.run(requests(url, group, 1))
    asyncio.run(requests(url, alone, 8))
    group_s = sum(asyncio.run(requests(url, group, 1))[0] for _ in range(repeats)) / repeats
    alone_s = sum(asyncio.run(requests(url, alone, 8))[0] for _ in range(repeats)) / repeats
    return {"group_ms": 1000 * group_s, "independent_ms": 1000 * alone_s, "ratio": alone_s / group_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--latency-requests", type=int, default=128)
    parser.add_argument("--group-repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating offline / server rounds")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--device", help="cpu or cuda, for the server and the offline run (default: cuda if present)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="16 rows, a few requests: the code path, no figures")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.latency_requests, args.group_repeats, args.rounds = 16, 8, 1, 1
    signal.signal(signal.SIGALRM, lambda *_: sys.exit(f"stopped after --max-seconds {args.max_seconds:g}"))
    signal.alarm(int(args.max_seconds))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = args.model or build_model(work / "model")
    texts = make_rows(model, args.rows)
    server = Server(model, work / "server.log", args.device)
    try:
        measured = rounds(model, server.url, texts, work, args.device, args.rounds)
        waits = latency(server.url, texts, args.latency_requests, args.smoke)
        shared = groups(server.url, args.group_repeats)
    finally:
        server.stop()
    print(f"throughput, {len(texts)} rows of 16-512 tokens ({measured[0]['offline']['tokens']} tokens), "
          f"{len(measured)} rounds of offline / server /v1/values / server /get_reward (64 clients, one row each):")
    for index, r in enumerate(measured, 1):
        print(f"  round {index}: offline {r['offline']['tokens_per_s']:8,.0f} tokens/s (model load excluded); "
              f"/v1/values {r['values']['tokens_per_s']:8,.0f} ({r['values_ratio']:.2f}x); "
              f"/get_reward {r['get_reward']['tokens_per_s']:8,.0f} ({r['get_reward_ratio']:.2f}x)")
    print(f"  server/offline, /v1/values:  {spread([r['values_ratio'] for r in measured])} (goal >= 0.8x)")
    print(f"  server/offline, /get_reward: {spread([r['get_reward_ratio'] for r in measured])} (goal >= 0.8x)")
    for clients, figures in waits.items():
        print(f"latency, {clients:2d} client{'s' if clients > 1 else ' '} ({figures['requests']} one-row requests): "
              f"p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms")
    print(f"/v1/groups, prompt 512 + 8 x 64: {shared['group_ms']:.1f} ms; the 8 sequences as independent requests "
          f"{shared['independent_ms']:.1f} ms; ratio {shared['ratio']:.2f}x (goal >= 3x)")
    if args.json:
        figures = {"device": args.device, "smoke": args.smoke, "rounds": measured,
                   "server_vs_offline": statistics.median(r["values_ratio"] for r in measured),
                   "get_reward_vs_offline": statistics.median(r["get_reward_ratio"] for r in measured),
                   "latency": {str(k): v for k, v in waits.items()}, "groups": shared}
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
