"""``vexport generate``: answer every prompt of a JSONL file with one search, one JSONL record per prompt.

A prompt line is ``{"prompt": "text"}`` (encoded as it is) or ``{"messages": [{role, content}, ...]}``
(rendered with the policy tokenizer's chat template and its generation prompt). Each output line is the input
record with ``search``, ``response`` (text), ``response_ids``, ``values``, ``forwards``, ``tokens`` and
``seconds`` added. The output is written to a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from vexport.decoding.searches import SEARCHES, best_of_n_search, greedy_search, guided_search, mcts_search
from vexport.errors import InputError, VexportError
from vexport.jsonl import parse_json, read_lines
from vexport.progress import progress_bar

log = logging.getLogger(__name__)

SEARCH_FUNCTIONS = {"greedy": greedy_search, "best-of-n": best_of_n_search, "guided": guided_search,
                    "mcts": mcts_search}


def read_prompts(path: Path) -> list[dict]:
    """The prompt records of a JSONL file (blank lines skipped); one clear error naming the file and line."""
    records = []
    for number, line in read_lines(Path(path), str(path)):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = parse_json(line, where)
        if not isinstance(record, dict) or not (isinstance(record.get("prompt"), str) or "messages" in record):
            raise InputError(f"{where}: each line must be an object with a string 'prompt' or a 'messages' list")
        records.append(record)
    if not records:
        raise InputError(f"{path}: no prompts")
    return records


def encode_prompt(tokenizer, record: dict, where: str) -> list[int]:
    from vexport.evalset import checked_messages, encode, render

    if isinstance(record.get("prompt"), str):
        ids = encode(tokenizer, record["prompt"])
    else:
        ids = encode(tokenizer, render(tokenizer, checked_messages(record["messages"], where), ""))
    if not ids:
        raise InputError(f"{where}: the prompt encodes to no tokens")
    return ids


def load_policy(path: str, device: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"--policy {path}: cannot load a causal LM ({' '.join(str(exc).split())[:200]})") from None
    return policy.to(device or "cpu"), tokenizer


SETTINGS = {  # the flags each search takes (the rest of generate_file's settings are left out)
    "greedy": ("max_new_tokens",),
    "best-of-n": ("max_new_tokens", "n", "temperature", "seed"),
    "guided": ("max_new_tokens", "top_k", "beta"),
    "mcts": ("max_new_tokens", "sim", "k", "c_puct", "te", "do_sample", "td", "anneal_td", "top_p", "gamma",
             "kl_coef", "clamp_kl", "reward_gain", "reward_bias", "mode", "leaves", "reuse_tree", "virtual_loss",
             "seed"),
}


def generate_file(policy_path: str, value_path: str, prompts: Path, output: Path, search: str, settings: dict,
                  device: str | None = None, progress: bool = False, ref_policy: str | None = None,
                  reward_model: str | None = None) -> int:
    """Run ``search`` over every prompt of ``prompts`` into ``output`` (JSONL); the number of prompts.
    ``settings``: keyword arguments of the search functions (those the search does not take are ignored)."""
    from vexport.runtime import load

    if search not in SEARCHES:
        raise InputError(f"--search must be one of {', '.join(SEARCHES)}, got {search!r}")
    settings = {k: v for k, v in settings.items() if k in SETTINGS[search]}
    records = read_prompts(prompts)
    policy, tokenizer = load_policy(policy_path, device)
    value_model = load(value_path, device=device)
    if search == "mcts":
        settings["ref_policy"] = load_policy(ref_policy, device)[0] if ref_policy else None
        settings["reward_model"] = load(reward_model, device=device) if reward_model else None
    encoded = [encode_prompt(tokenizer, r, f"{prompts}:{i + 1}") for i, r in enumerate(records)]
    run = SEARCH_FUNCTIONS[search]
    lines = []
    with progress_bar(f"{search} on {len(records)} prompts", len(records), progress) as advance:
        for record, ids in zip(records, encoded):
            generation = run(policy, value_model, ids, **settings)
            text = tokenizer.decode(generation.response, skip_special_tokens=True)
            lines.append({**record, "search": search, "response": text, "response_ids": generation.response,
                          **{k: v for k, v in generation.record().items() if k != "response"}})
            advance()
    _write_jsonl(output, lines)
    return len(lines)


def _write_jsonl(output: Path, lines: list[dict]) -> None:
    output = Path(output)
    if output.is_dir():
        raise InputError(f"--output {output}: is a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.partial-", dir=output.parent or ".")
    except OSError as exc:
        raise VexportError(f"--output {output}: cannot write ({' '.join(str(exc).split())})") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
    os.replace(tmp, output)
