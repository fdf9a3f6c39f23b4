"""scripts/bench_onnx_cpu.py without llama.cpp: bad flags exit 2 with one line, the llama.cpp rows are skipped
with a line saying how to install them, the score head on post-norm hidden states gives the value model's
values (what the llama.cpp and GenAI rows rely on), and the head-to-head ratios pair rounds."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "bench_onnx_cpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_onnx_cpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


@pytest.mark.parametrize(("args", "flag"), [(["--gguf-converter", "/nonexistent/convert_hf_to_gguf.py"],
                                             "--gguf-converter"),
                                            (["--shapes", "8by256"], "--shapes"),
                                            (["--shapes", "0x64"], "--shapes")])
def test_bad_flags_exit_2_with_one_line(args, flag, tmp_path):
    done = run_script("--work", str(tmp_path), *args)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(flag) and len(done.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # refused before anything was built


def test_parse_shapes(bench):
    assert bench.parse_shapes(["1x64", "8X256"]) == ((1, 64), (8, 256))


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None,
                    reason="llama-cpp-python is installed here: the skip line is for machines without it")
def test_llama_cpp_rows_skipped_with_install_line(bench, tiny_model_dir, tmp_path, capsys):
    assert bench.gguf_files(tiny_model_dir, tmp_path, None) == {}
    out = capsys.readouterr().out.strip()
    assert out.startswith("llama-cpp-python is not installed: the llama.cpp rows are skipped")
    assert "pip install llama-cpp-python" in out and "convert_hf_to_gguf.py" in out and len(out.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_score_head_on_causal_lm_hidden_states_gives_values(bench, tiny_model_dir, tmp_path):
    """The backbone folder the converter reads, run as a causal LM: its last hidden states (after the final
    norm) through score_head/as_values equal the value model's values."""
    from transformers import AutoModelForTokenClassification, LlamaForCausalLM

    folder = bench.causal_lm_folder(tiny_model_dir, tmp_path / "causal_lm")
    ids = torch.randint(0, 100, (2, 9))
    with torch.inference_mode():
        hidden = LlamaForCausalLM.from_pretrained(folder)(ids, output_hidden_states=True).hidden_states[-1]
        logits = AutoModelForTokenClassification.from_pretrained(tiny_model_dir)(ids).logits
    head = bench.score_head(tiny_model_dir)
    assert head[0].shape == (1, hidden.shape[-1])
    np.testing.assert_allclose(bench.as_values(hidden.numpy(), head), logits[..., 0].numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(bench.as_values([logits.numpy()], head), logits[..., 0].numpy())


def test_head_to_head_pairs_rounds(bench, capsys):
    shape = (1, 64)
    times = {"vexport optimized fp32": {shape: [1.0, 2.0, 1.0]},  # seconds per round
             "llama.cpp F32": {shape: [1.2, 2.8, 1.4]}}
    bench.print_head_to_head(times, [shape])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("| vexport optimized fp32 / llama.cpp F32 (target >= 1.3x) |")
    assert "1.40x (1.20-1.40), met" in row  # per-round ratios 1.2, 1.4, 1.4
