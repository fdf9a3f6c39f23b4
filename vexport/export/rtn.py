"""The round-to-nearest GPTQ v1 checkpoint: a whole GPTQ folder of a value model, without calibration data.

The baseline the calibrated exporter (``export/gptq.py``) is measured against, and the quick way tests and
scripts get an int4 folder. Same layout as every GPTQ folder vexport writes (``vexport.quant.checkpoint``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vexport.artifact import check_output, staging_dir
from vexport.errors import VexportError
from vexport.export.common import copy_support_files, value_io_spec, write_manifest
from vexport.model import open_model
from vexport.quant.checkpoint import (INDEX_NAME, ShardWriter, gptq_quantization_config, linear_prefixes,
                                      quantize_rtn_act_order, write_gptq_config)
from vexport.quant.pack import pack_gptq_v1
from vexport.quant.reference import quantize_rtn

log = logging.getLogger(__name__)


def _quantize_layer(source, prefixes: list[str], qconfig: Mapping[str, Any]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for prefix in prefixes:
        weight = source.read_tensor(f"{prefix}.weight").float()
        if not bool(torch.isfinite(weight).all()):
            raise VexportError(f"{source.path}: tensor {prefix}.weight holds NaN or infinite values: it cannot be "
                               "quantized")
        if qconfig["desc_act"]:
            qw = quantize_rtn_act_order(weight, qconfig["group_size"], qconfig["sym"])
        else:
            qw = quantize_rtn(weight, bits=4, group_size=qconfig["group_size"], sym=qconfig["sym"],
                              name=f"{prefix}.weight")
        out.update({f"{prefix}.{k}": v for k, v in pack_gptq_v1(qw).items()})
        if f"{prefix}.bias" in source.tensors:
            out[f"{prefix}.bias"] = source.read_tensor(f"{prefix}.bias").to(torch.float16)
    return out


def _float16_rest(source, quantized: set[str]) -> dict[str, Tensor]:
    """Every tensor that is not a quantized Linear's weight or bias, floats cast to float16."""
    rest = {}
    for name in sorted(set(source.tensors) - quantized):
        tensor = source.read_tensor(name)
        rest[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
    return rest


def write_rtn_checkpoint(model_dir: str | os.PathLike, output_dir: str | os.PathLike, group_size: int = 128,
                         sym: bool = True, desc_act: bool = False, *, force: bool = False) -> Path:
    """Round-to-nearest GPTQ v1 checkpoint of a value model: one shard per decoder layer, then the rest."""
    qconfig = gptq_quantization_config(4, group_size, desc_act, sym)
    output = Path(output_dir)
    check_output(output, force)
    source = open_model(model_dir)
    layers = source.config.num_hidden_layers
    quantized = {f"{p}.{s}" for i in range(layers) for p in linear_prefixes(i) for s in ("weight", "bias")}
    with staging_dir(output, force) as tmp:
        writer = ShardWriter(tmp)
        for i in range(layers):
            writer.add(_quantize_layer(source, linear_prefixes(i), qconfig))
        writer.add(_float16_rest(source, quantized))
        shards = writer.finish()
        copy_support_files(source.path, tmp)
        write_gptq_config(tmp, source.config, qconfig)
        options = {**qconfig, "method": "rtn", "shards": len(shards), "index": INDEX_NAME}
        write_manifest(tmp, "gptq", "int4", source, value_io_spec(), options)
    log.info("wrote an RTN GPTQ checkpoint (group %d, sym %s, desc_act %s) to %s", group_size, sym, desc_act, output)
    return output

