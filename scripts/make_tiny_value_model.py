"""Write a tiny random Llama value model (config, safetensors, BPE tokenizer with the Tulu template)."""

from __future__ import annotations

import argparse
import sys

import torch

from vexport.errors import VexportError
from vexport.tiny import make_tiny_value_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; the defaults are make_tiny_value_model's."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", help="folder to write the model to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gqa", action="store_true", help="fewer KV heads than attention heads")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--intermediate-size", type=int, default=None)
    parser.add_argument("--max-positions", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the model; a VexportError becomes one line on stderr and exit code 2."""
    args = parse_args(argv)
    try:
        path = make_tiny_value_model(
            args.output,
            seed=args.seed,
            gqa=args.gqa,
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            intermediate_size=args.intermediate_size,
            max_position_embeddings=args.max_positions,
            dtype=DTYPES[args.dtype],
        )
    except VexportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
