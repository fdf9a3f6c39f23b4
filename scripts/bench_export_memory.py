"""Peak host memory of `vexport export --format onnx` against the bytes of the weights it writes.

Builds a value model with 13B-sized layers (hidden 5120, intermediate 13824, 40 heads, vocabulary 32000) and
2 decoder layers, then exports it in child processes (float16 and float32) and prints each child's peak RSS
over the weight bytes in the export dtype, measured in this one run. A baseline child that only imports
the same libraries shows what the interpreter itself holds.

    python scripts/bench_export_memory.py [--layers 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# VmHWM is the high-water mark of this process's own address space (ru_maxrss would carry the parent's
# RSS over fork and exec).
CHILD = """
import sys
from vexport.export.onnx import export_onnx
if sys.argv[1] != "baseline":
    export_onnx(sys.argv[1], sys.argv[2], sys.argv[3])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(int(hwm.split()[1]) * 1024)
"""


def build_model(folder: Path, layers: int) -> int:
    """A random fp16 value model with 13B-sized layers; returns its parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                         num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=2048,
                         num_labels=1, architectures=["LlamaForTokenClassification"], pad_token_id=0)
    config.save_pretrained(folder)
    from transformers import LlamaForTokenClassification

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForTokenClassification(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=generator, dtype=torch.float32) * 0.02).half() for k, s in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"))
    return sum(t.numel() for t in tensors.values())


def peak_rss(*args: str) -> int:
    result = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vexport-bench-"))
    params = build_model(work / "model", args.layers)
    baseline = peak_rss("baseline")
    rows = []
    for dtype, width in (("float16", 2), ("float32", 4)):
        peak = peak_rss(str(work / "model"), str(work / f"onnx-{dtype}"), dtype)
        weights = params * width
        rows.append({"dtype": dtype, "weights_gb": weights / 1e9, "peak_rss_gb": peak / 1e9,
                     "peak_over_weights": peak / weights, "above_baseline_over_weights": (peak - baseline) / weights})
    print(f"model: {params / 1e9:.2f}B parameters ({args.layers} layers of 13B shape); "
          f"baseline interpreter+libraries RSS {baseline / 1e9:.2f} GB")
    print(f"{'dtype':8} {'weights GB':>10} {'peak RSS GB':>12} {'peak/weights':>13} {'(peak-base)/weights':>20}")
    for r in rows:
        print(f"{r['dtype']:8} {r['weights_gb']:10.2f} {r['peak_rss_gb']:12.2f} {r['peak_over_weights']:13.2f} "
              f"{r['above_baseline_over_weights']:20.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
