"""Per-module quantization overrides: GPTQModel's ``dynamic`` field of ``quantization_config``.

``dynamic`` maps a regex KEY to a dict of overrides. A key ``"-:REGEX"`` skips the modules it matches (their
weight stays float16, under its usual ``.weight`` name); ``"+:REGEX"`` or a bare ``"REGEX"`` overrides the
checkpoint's ``bits`` / ``group_size`` / ``sym`` / ``desc_act`` for the modules it matches, the fields it does
not name keeping the checkpoint's. The REGEX is tried with ``re.match`` (anchored at the start, not the end)
against the module's full name (``model.layers.3.mlp.down_proj``), keys in their order, and the first key
that matches decides; a module no key matches takes the checkpoint's own settings. This is how GPTQModel's
``dynamic_get`` and vLLM's ``get_dynamic_override`` read it (both written from their code, not copied).

vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` and resolves the override on the fused
name, so a plan that gives q, k and v (or gate and up) different settings cannot be served by vLLM:
``vllm_fusion_conflicts`` names them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from vexport.errors import InputError

SKIP, OVERRIDE = "-:", "+:"
OVERRIDE_FIELDS = ("bits", "group_size", "sym", "desc_act")
PLAN_BITS = (4, 8)  # what every vexport reader runs (GPTQ v1 packs 2, 4 and 8 evenly; 3 straddles words)
SCALE_BITS = 16  # a float16 scale per group and output
LINEAR_ORDER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")  # forward order: how tables list the module types
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class ModuleQuant:
    """How one Linear is stored: ``bits`` per code, ``group_size`` (-1: one group), ``sym``, ``desc_act``."""

    bits: int
    group_size: int
    sym: bool = True
    desc_act: bool = False

    @property
    def label(self) -> str:
        """Compact: ``4g128``, ``8g32``, ``4g-1``."""
        return f"{self.bits}g{self.group_size}"

    def stored_bits(self, in_features: int) -> float:
        """Bits stored per weight, counting the float16 scale and the packed zero point of each group."""
        group = in_features if self.group_size == -1 else min(self.group_size, in_features)
        return self.bits + (SCALE_BITS + self.bits) / group


FLOAT16_BITS = 16.0
FLOAT16_LABEL = "fp16"


def check_dynamic(dynamic: Any, where: str) -> dict[str, dict[str, Any]]:
    """DYNAMIC checked (a dict of regex keys to dicts of overrides, every regex compiling, every bits/group
    override an integer); returned as a plain dict in its order. WHERE names the file or flag in errors."""
    if not isinstance(dynamic, Mapping):
        raise InputError(f"{where}: dynamic must be an object of regex keys, got {type(dynamic).__name__}")
    checked = {}
    for key, overrides in dynamic.items():
        if not isinstance(key, str) or not isinstance(overrides, Mapping):
            raise InputError(f"{where}: dynamic key {key!r} must be a string mapped to an object of overrides")
        try:
            re.compile(pattern_of(key))
        except re.error as exc:
            raise InputError(f"{where}: dynamic key {key!r} is not a regular expression ({exc})") from None
        for name in ("bits", "group_size"):
            if name in overrides and (not isinstance(overrides[name], int) or isinstance(overrides[name], bool)):
                raise InputError(f"{where}: dynamic[{key!r}].{name} must be an integer, got {overrides[name]!r}")
        for name in ("sym", "desc_act"):
            if name in overrides and not isinstance(overrides[name], bool):
                raise InputError(f"{where}: dynamic[{key!r}].{name} must be true or false, got {overrides[name]!r}")
        checked[key] = dict(overrides)
    return checked


def pattern_of(key: str) -> str:
    """The regex of a dynamic key, without its ``+:`` / ``-:`` prefix."""
    return key[2:] if key.startswith((SKIP, OVERRIDE)) else key


def resolve(dynamic: Mapping[str, Mapping[str, Any]] | None, module: str, base: ModuleQuant) -> ModuleQuant | None:
    """The settings of MODULE (its full name): None when a ``-:`` key skips it, else BASE with the first
    matching key's overrides."""
    for key, overrides in (dynamic or {}).items():
        if re.match(pattern_of(key), module):
            if key.startswith(SKIP):
                return None
            return replace(base, **{k: overrides[k] for k in OVERRIDE_FIELDS if k in overrides})
    return base


def check_plan_entry(quant: ModuleQuant, module: str, where: str) -> None:
    """Raise InputError unless every vexport reader takes QUANT (bits 4 or 8; group -1 or a multiple of 8)."""
    if quant.bits not in PLAN_BITS:
        raise InputError(f"{where}: {module} resolves to {quant.bits} bits; vexport reads {PLAN_BITS[0]} or "
                         f"{PLAN_BITS[1]}")
    if quant.group_size != -1 and (quant.group_size < 8 or quant.group_size % 8):
        raise InputError(f"{where}: {module} resolves to group_size {quant.group_size}; it must be -1 or a "
                         "multiple of 8")


def vllm_fusion_conflicts(plan: Mapping[str, ModuleQuant | None], dynamic: Mapping[str, Any] | None = None,
                          base: ModuleQuant | None = None) -> list[str]:
    """The fused modules vLLM builds (``qkv_proj``, ``gate_up_proj`` of each layer) that cannot hold the plan:
    their parts resolve to different settings, or (given DYNAMIC and BASE) the fused name itself resolves to
    other settings than its parts (a key ``(q|k|v)_proj`` does not match ``qkv_proj``)."""
    conflicts = []
    for name in plan:
        for fused, parts in VLLM_FUSED.items():
            if name.endswith("." + parts[0]):
                stem = name[: -len(parts[0])]
                settings = {plan.get(stem + p, "absent") for p in parts}
                if base is not None:
                    settings.add(resolve(dynamic, stem + fused, base))
                if len(settings) > 1:
                    conflicts.append(stem + fused)
    return conflicts


def load_dynamic(value: Any, where: str = "--dynamic") -> dict[str, dict[str, Any]] | None:
    """A per-module plan from the API or the CLI: a dict of dynamic keys, or a JSON file holding one (or a
    quantize_config.json with a ``dynamic`` field). Errors name WHERE (the flag) and the file."""
    import json
    import os
    from pathlib import Path

    if value is None or isinstance(value, Mapping):
        return check_dynamic(value, where) if value is not None else None
    if not isinstance(value, (str, os.PathLike)):
        raise InputError(f"{where} must be a JSON file or a dict of dynamic keys, got {type(value).__name__}")
    path = Path(value)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{where} {path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{where} {path}: not valid JSON ({type(exc).__name__})") from None
    if isinstance(data, Mapping) and isinstance(data.get("dynamic"), Mapping):
        data = data["dynamic"]
    return check_dynamic(data, f"{where} {path}")


def allocation(plan: Mapping[str, ModuleQuant | None], shapes: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    """What the manifest records: per module type (``self_attn.q_proj``) the label of each layer's Linear in
    layer order (``4g128``, ``8g32``, ``fp16``), and the average stored bits per weight (scales and zeros
    counted; float16 Linears at 16). SHAPES: [out, in] of each Linear by full name."""
    modules: dict[str, list[str]] = {}
    weights = total_bits = 0.0
    for name, quant in plan.items():
        kind = name.split(".", 3)[3]  # model.layers.N.<kind>
        modules.setdefault(kind, []).append(FLOAT16_LABEL if quant is None else quant.label)
        out_f, in_f = shapes[name]
        weights += out_f * in_f
        total_bits += out_f * in_f * (FLOAT16_BITS if quant is None else quant.stored_bits(in_f))
    return {"modules": modules, "average_bits": round(total_bits / weights, 4) if weights else None}


def allocation_lines(alloc: Mapping[str, Any]) -> list[str]:
    """One line per module type, layers run-length encoded: ``self_attn.v_proj: L0-1 8g32, L2-29 4g128``."""
    lines = []
    for kind, labels in in_forward_order(alloc.get("modules", {})):
        if not isinstance(labels, list) or not labels:
            continue  # a hand-edited manifest: nothing to show for this type
        runs, start = [], 0
        for i in range(1, len(labels) + 1):
            if i == len(labels) or labels[i] != labels[start]:
                span = f"L{start}" if i - 1 == start else f"L{start}-{i - 1}"
                runs.append(f"{span} {labels[start]}")
                start = i
        lines.append(f"{kind}: {', '.join(runs)}")
    return lines


def in_forward_order(modules: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The (module type, value) items of MODULES in forward order (a manifest's keys come back sorted)."""
    rank = {kind: i for i, kind in enumerate(LINEAR_ORDER)}
    return sorted(modules.items(), key=lambda item: rank.get(item[0], len(rank)))
