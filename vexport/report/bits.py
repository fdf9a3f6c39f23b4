"""The per-module bits table of a mixed-precision export: one row per decoder layer, one column per Linear type.

Drawn from the allocation the GPTQ exporter records in the manifest (``format_options.allocation``, carried in a
report entry's ``export``): cells are ``4g128`` (bits and group size), ``8g32`` or ``fp16`` (left unquantized).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vexport.quant.dynamic import in_forward_order

SHORT = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
         "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}


def bits_table(allocation: Any) -> dict[str, Any] | None:
    """``{"header": [...], "rows": [[layer, label, ...], ...], "average_bits": x}``; None when ALLOCATION is
    absent or not the recorded form (a hand-edited manifest draws no table)."""
    if not isinstance(allocation, Mapping) or not isinstance(allocation.get("modules"), Mapping):
        return None
    modules = {k: v for k, v in in_forward_order(allocation["modules"]) if isinstance(v, list) and v}
    if not modules:
        return None
    layers = max(len(v) for v in modules.values())
    rows = [[str(i), *(str(v[i]) if i < len(v) else "—" for v in modules.values())] for i in range(layers)]
    return {"header": ["Layer", *(SHORT.get(k, k) for k in modules)], "rows": rows,
            "average_bits": allocation.get("average_bits")}


def is_mixed(table: Mapping[str, Any]) -> bool:
    """Whether the table holds more than one label (a uniform export needs no table)."""
    return len({cell for row in table["rows"] for cell in row[1:]}) > 1
