"""Small helpers shared by tests: run the CLI as a subprocess, build broken model folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`vexport ARGS...` in a fresh interpreter, as a user runs it."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "vexport", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def leftovers(parent: Path) -> list[str]:
    """Temporary or partial folders an interrupted write could leave behind."""
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def make_causal_lm(src: Path, dst: Path) -> Path:
    """The same backbone saved as LlamaForCausalLM: no score head."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(src)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    return dst


def make_pickle_only(src: Path, dst: Path) -> Path:
    """The same value model with its weights in pytorch_model.bin instead of safetensors."""
    from safetensors.torch import load_file

    copy_model(src, dst)
    state = load_file(dst / "model.safetensors")
    torch.save(state, dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    return dst


def make_mistral(folder: Path, tmp_path: Path, window: int | None) -> Path:
    """FOLDER's tiny value model as Mistral (TMP_PATH/mistral, weights seed 3) with a sliding window (None:
    none; transformers applies it) and FOLDER's tokenizer."""
    from transformers import AutoConfig, MistralConfig, MistralForTokenClassification

    from vexport.tiny import init_value_weights

    llama = AutoConfig.from_pretrained(folder).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        llama.pop(key, None)
    config = MistralConfig(**llama, sliding_window=window)
    config.architectures = ["MistralForTokenClassification"]
    model = MistralForTokenClassification(config)
    init_value_weights(model, seed=3)
    out = tmp_path / "mistral"
    model.save_pretrained(out)
    for name in os.listdir(folder):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copyfile(folder / name, out / name)
    return out


def hub_snapshot(tmp_path: Path) -> tuple[Path, Path]:
    """A hub-cache layout: <repo>/snapshots/rev/config.json -> ../../blobs/abc. Returns (repo, snapshot)."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("{}")
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to("../../blobs/abc")
    return repo, snapshot
