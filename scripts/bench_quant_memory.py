"""Peak host memory of streaming GPTQ export for the same layer shape at 2, 4 and 8 decoder layers.

Streaming quantization holds the embeddings, one decoder layer and the calibration activations, so its peak
memory should stay flat as layers are added, while the model grows. Each export runs in a child process and
reports its own high-water mark (VmHWM); all figures come from this one run.

    python scripts/bench_quant_memory.py [--hidden 1024 --intermediate 2816 --heads 16] [--layers 2 4 8]
    python scripts/bench_quant_memory.py --hidden 5120 --intermediate 13824 --heads 40 --device cuda   # 13B layers
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys
from vexport.export.gptq import export_gptq
export_gptq(sys.argv[1], sys.argv[2], samples=int(sys.argv[3]), seq_len=int(sys.argv[4]), device=sys.argv[5])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(int(hwm.split()[1]) * 1024)
"""


def build(folder: Path, layers: int, hidden: int, intermediate: int, heads: int) -> int:
    """A random value model of LAYERS layers (weights in fp16) with the tiny model's tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForTokenClassification

    from vexport.tiny import make_tiny_value_model

    make_tiny_value_model(folder)  # tokenizer and chat template; the weights are replaced below
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=heads, num_hidden_layers=layers, vocab_size=1000,
                         max_position_embeddings=2048, num_labels=1, pad_token_id=3,
                         architectures=["LlamaForTokenClassification"])
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForTokenClassification(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=gen) * (s[-1] ** -0.5 if len(s) == 2 else 1.0)).half() for k, s in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"))
    return sum(t.numel() * 2 for t in tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vexport-qmem-"))
    print(f"layer shape: hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads; "
          f"calibration {args.samples} x {args.seq_len} tokens on {args.device}")
    print("| layers | fp16 weights GB | peak RSS GB | peak / peak at first size |")
    print("|---|---|---|---|")
    first = None
    for layers in args.layers:
        size = build(work / f"m{layers}", layers, args.hidden, args.intermediate, args.heads)
        result = subprocess.run([sys.executable, "-c", CHILD, str(work / f"m{layers}"), str(work / f"q{layers}"),
                                 str(args.samples), str(args.seq_len), args.device],
                                capture_output=True, text=True, check=True)
        peak = int(result.stdout.strip().splitlines()[-1])
        first = first or peak
        print(f"| {layers} | {size / 1e9:.2f} | {peak / 1e9:.2f} | {peak / first:.2f} |")


if __name__ == "__main__":
    main()
