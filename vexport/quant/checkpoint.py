"""The GPTQ v1 checkpoint folder: sharded safetensors, config.json with quantization_config, manifest.json.

Per quantized Linear with checkpoint prefix P: ``P.qweight`` int32 [I/8, O], ``P.qzeros`` int32 [G, O/8],
``P.scales`` float16 [G, O], ``P.g_idx`` int32 [I] and ``P.bias`` float16 when the Linear has one (FORMATS.md).
Every other tensor (embeddings, norms, ``score.weight``, ``score.bias``) is float16 under its usual name.
A mixed checkpoint's ``quantization_config.dynamic`` (GPTQModel's per-module overrides, quant/dynamic.py)
gives some Linears other bits or groups (then ``qweight`` is [I*bits/32, O]) or leaves them float16
(``P.weight``); ``module_plan`` resolves it for every decoder Linear.

``ShardWriter`` writes each shard as soon as it is given, so a streaming quantizer holds one layer at a time.
The round-to-nearest baseline that writes a whole folder without calibration is ``vexport.export.rtn``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vexport.errors import VexportError
from vexport.quant.dynamic import ModuleQuant, check_dynamic, check_plan_entry, resolve
from vexport.quant.types import QuantizedWeight

log = logging.getLogger(__name__)

QUANTIZED_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GPTQ_FIELDS = ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")
INDEX_NAME = "model.safetensors.index.json"
QUANTIZE_CONFIG_NAME = "quantize_config.json"
SUPPORTED_BITS = (4, 8)


def gptq_quantization_config(bits: int, group_size: int, desc_act: bool, sym: bool,
                             dynamic: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` of a GPTQ v1 checkpoint (FORMATS.md), also written as quantize_config.json;
    DYNAMIC (GPTQModel's per-module overrides) is written as given, in its order, when there is one."""
    if bits not in SUPPORTED_BITS:
        raise VexportError(f"--bits {bits} is not supported for GPTQ checkpoints (4 or 8)")
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise VexportError(f"--group-size {group_size} must be -1 (one group) or a positive integer")
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": bool(desc_act),
              "sym": bool(sym), "checkpoint_format": "gptq"}
    if dynamic:
        config["dynamic"] = {key: dict(value) for key, value in dynamic.items()}
    return config


def quantization_config_of(config: Any) -> dict[str, Any] | None:
    """``quantization_config`` of a transformers config or a config dict, as a dict (None when absent)."""
    qconfig = config.get("quantization_config") if isinstance(config, Mapping) else \
        getattr(config, "quantization_config", None)
    if qconfig is not None and not isinstance(qconfig, Mapping):
        qconfig = qconfig.to_dict() if hasattr(qconfig, "to_dict") else None
    return dict(qconfig) if qconfig is not None else None


def is_gptq_config(config: Any) -> bool:
    """True when the config declares a GPTQ checkpoint (``quantization_config.quant_method == "gptq"``)."""
    qconfig = quantization_config_of(config)
    return bool(qconfig) and str(qconfig.get("quant_method", "")).lower() == "gptq"


def gptq_options(config: Any, where: str | os.PathLike = "config.json") -> dict[str, Any]:
    """The GPTQ fields of a config, checked: 4 bits, v1 packing (``checkpoint_format: gptq``)."""
    qconfig = quantization_config_of(config)
    if not qconfig or str(qconfig.get("quant_method", "")).lower() != "gptq":
        raise VexportError(f"{where} has no GPTQ quantization_config (quant_method gptq)")
    fmt = qconfig.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise VexportError(f"{where}: checkpoint_format {fmt!r} is not supported (only 'gptq', the v1 packing)")
    if qconfig.get("bits") not in SUPPORTED_BITS:
        raise VexportError(f"{where}: quantization_config bits {qconfig.get('bits')!r} is not supported (4 or 8)")
    group_size = qconfig.get("group_size", -1)
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise VexportError(f"{where}: quantization_config group_size {group_size!r} is not -1 or positive")
    dynamic = qconfig.get("dynamic")
    dynamic = check_dynamic(dynamic, f"{where}: quantization_config") if dynamic is not None else None
    return {**qconfig, "checkpoint_format": fmt, "group_size": group_size, "dynamic": dynamic or None,
            "desc_act": bool(qconfig.get("desc_act", False)), "sym": bool(qconfig.get("sym", True))}


def base_quant(options: Mapping[str, Any]) -> ModuleQuant:
    """The checkpoint-wide settings (what a module no dynamic key matches gets)."""
    return ModuleQuant(options["bits"], options["group_size"], options["sym"], options["desc_act"])


def module_quant(options: Mapping[str, Any], prefix: str, where: str = "config.json") -> ModuleQuant | None:
    """The settings of the Linear PREFIX (full module name) under ``gptq_options``' OPTIONS: None when the
    checkpoint leaves it float16 (a ``-:`` dynamic key), else its bits / group / sym / desc_act, checked."""
    quant = resolve(options.get("dynamic"), prefix, base_quant(options))
    if quant is not None:
        check_plan_entry(quant, prefix, where)
    return quant


def module_plan(options: Mapping[str, Any], num_layers: int, where: str = "config.json"
                ) -> dict[str, ModuleQuant | None]:
    """``module_quant`` of every decoder Linear, by full module name, in layer then forward order."""
    return {prefix: module_quant(options, prefix, where) for i in range(num_layers) for prefix in linear_prefixes(i)}


class ShardWriter:
    """Writes tensors to safetensors shards one ``add`` at a time; ``finish`` names them ``-of-N`` and indexes.

    Until ``finish`` the shards carry temporary names, so a folder with an index is a finished one.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self._total_size = 0
        self._finished = False

    def add(self, tensors: Mapping[str, Tensor]) -> Path:
        """Write ``tensors`` as one new shard now (moved to CPU, made contiguous); returns its temporary path."""
        from safetensors.torch import save_file

        if self._finished:
            raise VexportError(f"{self.folder}: ShardWriter.add after finish()")
        if not tensors:
            raise VexportError(f"{self.folder}: ShardWriter.add got no tensors")
        repeated = sorted(set(tensors) & self._names)
        if repeated:
            raise VexportError(f"{self.folder}: tensor {repeated[0]} was already written to an earlier shard")
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        path = self.folder / f".shard-{len(self._shards) + 1:05d}.safetensors.partial"
        save_file(cpu, str(path), metadata={"format": "pt"})
        self._shards.append((path, sorted(cpu)))
        self._names.update(cpu)
        self._total_size += sum(t.numel() * t.element_size() for t in cpu.values())
        return path

    def finish(self) -> list[str]:
        """Rename shards to ``model-0000i-of-0000N.safetensors``, write the index; returns the shard names."""
        if self._finished or not self._shards:
            raise VexportError(f"{self.folder}: ShardWriter.finish needs at least one shard, and runs once")
        count, names, weight_map = len(self._shards), [], {}
        for i, (path, tensor_names) in enumerate(self._shards, start=1):
            name = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.folder / name)
            names.append(name)
            weight_map.update(dict.fromkeys(tensor_names, name))
        index = {"metadata": {"total_size": self._total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        self._finished = True
        log.info("wrote %d shard(s), %d tensors, to %s", count, len(weight_map), self.folder)
        return names


def write_gptq_config(folder: str | os.PathLike, source_config: Any, qconfig: Mapping[str, Any]) -> None:
    """config.json (the source config, float16, with ``quantization_config``) and quantize_config.json."""
    folder = Path(folder)
    config = dict(source_config) if isinstance(source_config, Mapping) else source_config.to_diff_dict()
    config.update({"dtype": "float16", "torch_dtype": "float16", "quantization_config": dict(qconfig)})
    (folder / "config.json").write_text(json.dumps(_sorted_keys(config), indent=2) + "\n")
    (folder / QUANTIZE_CONFIG_NAME).write_text(json.dumps(_sorted_keys(dict(qconfig)), indent=2) + "\n")


def _sorted_keys(value: Any) -> Any:
    """VALUE with every object's keys sorted (stable files), except ``dynamic``'s: its first match wins."""
    if not isinstance(value, Mapping):
        return value
    return {key: item if key == "dynamic" else _sorted_keys(item) for key, item in sorted(value.items())}


def linear_prefixes(layer: int) -> list[str]:
    """Checkpoint prefixes of the quantized Linears of decoder layer ``layer``."""
    return [f"model.layers.{layer}.{name}" for name in QUANTIZED_LINEARS]


def quantize_rtn_act_order(weight: Tensor, group_size: int = 128, sym: bool = True) -> QuantizedWeight:
    """RTN with act-order grouping and no calibration data: input columns are ordered by descending weight
    column norm, consecutive columns of that order form the groups, and ``g_idx`` records the permutation
    (codes stay in the original column order, as in a GPTQ ``desc_act`` checkpoint)."""
    from vexport.quant.reference import quantize_rtn

    order = torch.argsort(weight.detach().float().norm(dim=0), descending=True, stable=True)
    permuted = quantize_rtn(weight[:, order], bits=4, group_size=group_size, sym=sym)
    q, g_idx = torch.empty_like(permuted.q), torch.empty_like(permuted.g_idx)
    q[:, order], g_idx[order] = permuted.q, permuted.g_idx
    return QuantizedWeight(q, permuted.scales, permuted.zeros, g_idx, 4, group_size, sym, desc_act=True)
