"""ONNX Runtime's contrib operator domain (com.microsoft): MatMulNBits, GroupQueryAttention,
SkipSimplifiedLayerNormalization. Used by the fused graph, dense or int4, and by the int4 Linears."""

from __future__ import annotations

import onnx
from onnx import helper

CONTRIB_DOMAIN = "com.microsoft"


def add_contrib_opset(model: onnx.ModelProto) -> None:
    """Import the com.microsoft domain next to the standard opset (once)."""
    if not any(op.domain == CONTRIB_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
