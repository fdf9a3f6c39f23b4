"""Write a value model on the trained SmolLM2-135M-Instruct backbone (needs `pip install 'vexport[trained]'`)."""

from __future__ import annotations

import argparse
import sys

import torch

from vexport.errors import VexportError
from vexport.trained import make_trained_value_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    """Build the model; a VexportError becomes one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", help="folder to write the model to")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    try:
        path = make_trained_value_model(args.output, dtype=DTYPES[args.dtype])
    except VexportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
