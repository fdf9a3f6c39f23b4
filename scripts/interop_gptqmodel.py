"""Interoperability, shown: GPTQModel's own pure-torch kernel reads vexport's GPTQ v1 checkpoints.

For every quantized Linear of each checkpoint, the packed tensors are loaded into GPTQModel's
``TorchLinear`` (its pure-torch kernel) (v1 → v2 zero-point conversion by GPTQModel's own function, as its loader does) and
dequantized by GPTQModel in float16; the result is compared with vexport's reader (``dequantize_gptq_v1``)
in float16, bit for bit.

GPTQModel moves torch to a CUDA build, so run this in a separate virtual environment, never in CI:

    python3 -m venv /tmp/gptqm && /tmp/gptqm/bin/pip install gptqmodel && /tmp/gptqm/bin/pip install --no-deps -e .
    GPTQMODEL_CPU_WORKERS=2 /tmp/gptqm/bin/python scripts/interop_gptqmodel.py GPTQ_DIR [GPTQ_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from vexport.quant.pack import dequantize_gptq_v1


def linears(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            for name in fh.keys():
                prefix, _, part = name.rpartition(".")
                if part in ("qweight", "qzeros", "scales", "g_idx"):
                    tensors.setdefault(prefix, {})[part] = fh.get_tensor(name)
    return tensors


def gptqmodel_weight(parts: dict[str, torch.Tensor], qc: dict) -> torch.Tensor:
    """[O, I] float16, as GPTQModel's pure-torch kernel dequantizes it."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    in_f, out_f = parts["g_idx"].numel(), parts["scales"].shape[1]
    layer = TorchLinear(bits=qc["bits"], group_size=qc["group_size"], sym=qc["sym"], desc_act=qc["desc_act"],
                             in_features=in_f, out_features=out_f, bias=False)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        getattr(layer, name).data.copy_(parts[name])
    convert_gptq_v1_to_v2_format_module(layer, bits=qc["bits"], pack_dtype=torch.int32)
    layer.post_init()
    return layer.dequantize_weight().T  # [O, I], in the scales' dtype (float16)


def main(folders: list[str]) -> int:
    worst = 0.0
    for folder in map(Path, folders):
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        parts = linears(folder)
        diffs = [float((gptqmodel_weight(p, qc) - dequantize_gptq_v1(p, torch.float16)).abs().max())
                 for p in parts.values()]
        worst = max(worst, max(diffs))
        print(f"{folder}: group {qc['group_size']}, sym {qc['sym']}, desc_act {qc['desc_act']}: {len(diffs)} Linears, "
              f"max |GPTQModel - vexport| = {max(diffs):.3g}, identical in {sum(d == 0 for d in diffs)}/{len(diffs)}")
    print("SAME dequantized weights" if worst == 0 else f"DIFFERENT (max {worst:.3g})")
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
