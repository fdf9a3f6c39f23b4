"""On-disk size of the int4 GPTQ checkpoint against the fp16 checkpoint, for 13B-sized layers.

Builds a value model with 13B-sized layers (hidden 5120, intermediate 13824, 40 heads, vocabulary 32000) and
2 decoder layers, writes its GPTQ v1 checkpoint (group 128; the packing, hence the size, is the same for GPTQ
and round-to-nearest, so the faster RTN writer is used) and prints, from the files written in this run:
bytes per decoder layer int4 / fp16, and the whole-checkpoint ratio for 2 layers and for 40 layers (the
13B model: embeddings, norms and head + 40 measured layers).

    python scripts/bench_gptq_size.py [--group-size 128]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from safetensors import safe_open

from vexport.export.rtn import write_rtn_checkpoint


def tensor_bytes(folder: Path) -> dict[str, int]:
    sizes = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                sizes[name] = numel * {"F16": 2, "I32": 4, "F32": 4, "BF16": 2}[sl.get_dtype()]
    return sizes


def split(sizes: dict[str, int]) -> tuple[int, int]:
    """Bytes of decoder layer 0, and bytes outside the decoder layers."""
    layer = sum(v for k, v in sizes.items() if k.startswith("model.layers.0."))
    rest = sum(v for k, v in sizes.items() if not k.startswith("model.layers."))
    return layer, rest


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_export_memory import build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vexport-size-"))
    build_model(work / "fp16", 2)
    write_rtn_checkpoint(work / "fp16", work / "int4", group_size=args.group_size)
    fp_layer, fp_rest = split(tensor_bytes(work / "fp16"))
    q_layer, q_rest = split(tensor_bytes(work / "int4"))
    disk = lambda folder: sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # noqa: E731
    print(f"decoder layer (hidden 5120, intermediate 13824): fp16 {fp_layer / 1e6:.1f} MB, "
          f"int4 g{args.group_size} {q_layer / 1e6:.1f} MB, ratio {q_layer / fp_layer:.3f}")
    print(f"2-layer checkpoint on disk: fp16 {disk(work / 'fp16') / 1e9:.2f} GB, int4 {disk(work / 'int4') / 1e9:.2f} GB, "
          f"ratio {disk(work / 'int4') / disk(work / 'fp16'):.3f} (the fp16 embeddings dominate at 2 layers)")
    full_fp, full_q = fp_rest + 40 * fp_layer, q_rest + 40 * q_layer
    print(f"40 layers (13B): fp16 {full_fp / 1e9:.1f} GB, int4 {full_q / 1e9:.1f} GB, ratio {full_q / full_fp:.3f}")


if __name__ == "__main__":
    main()
