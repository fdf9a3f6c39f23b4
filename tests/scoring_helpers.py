"""For the scoring tests: mixed-length rows of every form and bad rows, JSONL and Parquet writers, reference
values, and runs of `vexport score` killed with SIGKILL at random points."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vexport.scoring import read_errors, read_scores

WORDS = ("the", "cat", "sat", "on", "a", "warm", "mat", "while", "rain", "fell", "over", "quiet", "city", "and",
         "every", "student", "answered", "question", "about", "rivers", "mountains", "bread", "is", "good",
         "Paris", "capital", "France", "seven", "times", "eight", "equals", "fifty-six", "yes", "no", "maybe")

# One row of each kind of bad input, with the start of the reason errors.jsonl must give.
BAD_ROWS = (
    ({"id": "bad-missing"}, "missing fields"),
    ({"text": "   ", "id": "bad-empty"}, "empty text"),
    ({"prompt": "only a prompt", "id": "bad-prompt"}, "missing field 'response'"),
    ({"text": 7, "id": "bad-type"}, "'text' must be a string"),
    ({"messages": [], "id": "bad-messages"}, "'messages' must be a non-empty list"),
)


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def mixed_rows(n: int, seed: int = 0, max_words: int = 40, bad_every: int | None = None,
               chats: float = 0.5) -> list[dict]:
    """N rows with ids: plain texts, then (a CHATS fraction) prompt/response pairs and chats, lengths spread
    from 1 to MAX_WORDS words; with BAD_EVERY, every so many rows is one of BAD_ROWS."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            rows.append(dict(BAD_ROWS[(i // bad_every) % len(BAD_ROWS)][0], id=f"r{i}"))
            continue
        kind, words = rng.random(), rng.randint(1, max_words)
        if kind >= chats:
            rows.append({"id": f"r{i}", "text": sentence(rng, words)})
        elif kind < 0.6 * chats:
            rows.append({"id": f"r{i}", "prompt": sentence(rng, rng.randint(1, 6)), "response": sentence(rng, words)})
        else:
            chat = [{"role": "user", "content": sentence(rng, 3)},
                    {"role": "assistant", "content": sentence(rng, words)}]
            rows.append({"id": f"r{i}", "messages": chat})
    return rows


def bad_rows(rows: list[dict]) -> dict[int, str]:
    """Positions of the BAD_ROWS in ROWS, with the start of the reason each must be rejected for."""
    return {i: reason for i, r in enumerate(rows) for bad, reason in BAD_ROWS if r == dict(bad, id=r["id"])}


def write_jsonl(path: Path, rows: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
        fh.writelines(line + "\n" for line in extra_lines)
    return path


def write_parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {k: [r.get(k) for r in rows] for k in ("id", "text", "prompt", "response", "messages")
               if any(k in r for r in rows)}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def reference_ids(tokenizer, row: dict, append_eos: bool = False) -> list[int]:
    """Token ids of a row, written out independently of vexport/scoring (Tulu format spelled out)."""
    if "text" in row:
        return tokenizer(row["text"])["input_ids"]
    if "prompt" in row:
        turns = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    else:
        turns = row["messages"]
    text = f"<|user|>\n{turns[0]['content']}\n<|assistant|>\n{turns[1]['content']}"
    ids = tokenizer(text)["input_ids"]
    return ids + [tokenizer.eos_token_id] if append_eos else ids


def reference_values(model, sequences: list[list[int]], batch: int = 32) -> list:
    """Per-token values from vexport.load(...).values(): batches of similar length, right-padded."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list = [None] * len(sequences)
    for k in range(0, len(order), batch):
        chunk = order[k:k + batch]
        width = max(len(sequences[i]) for i in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(chunk):
            ids[j, :len(sequences[i])] = torch.tensor(sequences[i])
            mask[j, :len(sequences[i])] = 1
        values = model.values(ids, mask)
        for j, i in enumerate(chunk):
            out[i] = values[j, :len(sequences[i])].numpy()
    return out


def _start(args: list, log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "vexport", *map(str, args)], stdout=fh, stderr=fh,
                                env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})


def _parts(out: Path) -> int:
    return len(list(out.glob("part-*.parquet"))) if out.is_dir() else 0


def make_medium_model(folder: Path) -> Path:
    """A random value model slow enough (~23 MFLOP a token) that a kill lands while windows remain."""
    from vexport.tiny import make_tiny_value_model

    return make_tiny_value_model(folder, seed=2, hidden_size=384, num_layers=6, num_heads=6)


def _wait_while_running(process: subprocess.Popen, seconds: float, until=lambda: False) -> None:
    end = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < end and not until():
        time.sleep(0.02)


def kill_at_random_points(args: list, out: Path, kills: int, rng: random.Random, log: Path,
                          first_anywhere: bool = True) -> list[int]:
    """Start ARGS KILLS times and SIGKILL it each time, then run it to the end; returns the parts at each kill.

    The first kill lands anywhere in the first 8 s (start-up, indexing, opening the output, scoring) when
    FIRST_ANYWHERE; the others at a random moment just after a new part (mid-window, -write, -rename, -append).
    A run that finishes before the first kill (a fast machine) is thrown away with its output and started
    again with the window halved, so the kills always happen; one that finishes before a later kill ends it.
    """
    parts_at_kill, window = [], 8.0
    while len(parts_at_kill) < kills:
        process, before = _start(args, log), _parts(out)
        first = not parts_at_kill and first_anywhere
        if first:
            _wait_while_running(process, rng.uniform(0.0, window))
        else:
            _wait_while_running(process, 300, until=lambda: _parts(out) > before)
            _wait_while_running(process, rng.uniform(0.0, 0.3))
        if process.poll() is not None:
            if not (first and process.returncode == 0 and window > 0.25):
                break
            shutil.rmtree(out)
            window /= 2
            continue
        parts_at_kill.append(_parts(out))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    final = _start(args, log)
    assert final.wait(timeout=600) == 0, log.read_text()[-3000:]
    return parts_at_kill


def assert_every_row_once(out: Path, uninterrupted: Path, rows: list[dict]) -> None:
    """OUT has every row of an uninterrupted run exactly once, the same values, and a whole errors.jsonl."""
    got, expected = read_scores(out), read_scores(uninterrupted)
    scored = got["row"].to_pylist()
    assert len(scored) == len(set(scored)) and scored == expected["row"].to_pylist()
    np.testing.assert_allclose(got["value"].to_numpy(), expected["value"].to_numpy(), rtol=1e-5, atol=1e-5)
    lines = (out / "errors.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == read_errors(uninterrupted)  # every line whole, each row once
    bad = set(bad_rows(rows))
    assert sorted(e["row"] for e in read_errors(out)) == sorted(bad) and set(scored).isdisjoint(bad)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["rows_read"] == len(rows)
    assert not list(out.glob(".*"))
