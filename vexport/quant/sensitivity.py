"""Value sensitivity of each decoder Linear group, and bits allocated under a size budget (RTN probes).

Sensitivity: every decoder Linear is rounded to nearest (RTN) at the base settings (4-bit g128), the value
model runs on the calibration windows and its per-token values are compared with the float model's (SQNR,
dB); then each *unit* alone is raised to the probe settings (8-bit g32) and the value SQNR measured again. The
gain in dB is that unit's sensitivity. Units are what vLLM can give settings to: per layer q/k/v (fused to
``qkv_proj`` there), o, gate/up (``gate_up_proj``) and down. Cost: one forward of the calibration windows per
unit plus one, 4 L + 2 in all (L layers), with the float model and two RTN copies of each Linear's weight
in memory; on a 13B model (40 layers) that is 162 forwards, minutes on one GPU, against hours of GPTQ.

Allocation: starting from the base everywhere, units are raised to the probe settings in order of gain per
added stored bit (scales and zero points counted, ``ModuleQuant.stored_bits``) while the average stored bits
per decoder Linear weight stays within the budget. The result is a GPTQModel ``dynamic`` dict with one ``+:``
key per raised unit, matching both the checkpoint's and vLLM's fused module names.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from vexport.errors import InputError
from vexport.quant.dynamic import ModuleQuant
from vexport.quant.reference import quantize_rtn

log = logging.getLogger(__name__)

PROBE = ModuleQuant(8, 32)
# unit name -> (its Linears inside a layer, the key's regex tail: the checkpoint's names and vLLM's fused one)
UNITS = {"qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), r"self_attn\.(qkv|q|k|v)_proj$"),
         "o": (("self_attn.o_proj",), r"self_attn\.o_proj$"),
         "gate_up": (("mlp.gate_proj", "mlp.up_proj"), r"mlp\.(gate_up|gate|up)_proj$"),
         "down": (("mlp.down_proj",), r"mlp\.down_proj$")}


def value_sqnr(reference: Tensor, values: Tensor) -> float:
    """20 log10(|reference| / |reference - values|) over every token, in dB."""
    error = (reference - values).double().norm()
    return float(20 * torch.log10(reference.double().norm() / error.clamp_min(1e-30)))


def unit_names(num_layers: int) -> list[str]:
    """``layer.unit`` for every unit, e.g. ``3.gate_up``."""
    return [f"{i}.{unit}" for i in range(num_layers) for unit in UNITS]


def _linears(model: nn.Module, unit: str) -> list[nn.Linear]:
    layer, name = unit.split(".")
    block = model.model.layers[int(layer)]
    return [block.get_submodule(linear) for linear in UNITS[name][0]]


def value_sensitivity(model: nn.Module, tokens: Tensor, base: ModuleQuant, probe: ModuleQuant = PROBE,
                      batch: int = 8) -> tuple[float, dict[str, float]]:
    """The value SQNR (dB) with every decoder Linear RTN-quantized at BASE, and per unit the SQNR gain when
    that unit alone is at PROBE. MODEL is the float value model (its weights are restored on return)."""
    units = unit_names(len(model.model.layers))
    originals = {u: [lin.weight.data for lin in _linears(model, u)] for u in units}
    rounded = {u: [[_rtn(w, q) for w in originals[u]] for q in (base, probe)] for u in units}
    try:
        reference = _values(model, tokens, batch)
        for u in units:
            _set(model, u, rounded[u][0])
        baseline = value_sqnr(reference, _values(model, tokens, batch))
        gains = {}
        for u in units:
            _set(model, u, rounded[u][1])
            gains[u] = value_sqnr(reference, _values(model, tokens, batch)) - baseline
            _set(model, u, rounded[u][0])
            log.info("sensitivity: unit %s gains %.2f dB at %s", u, gains[u], probe.label)
    finally:
        for u in units:
            _set(model, u, originals[u])
    return baseline, gains


def _rtn(weight: Tensor, quant: ModuleQuant) -> Tensor:
    return quantize_rtn(weight, quant.bits, quant.group_size, quant.sym).dequantize(weight.dtype)


def _set(model: nn.Module, unit: str, weights: list[Tensor]) -> None:
    for linear, weight in zip(_linears(model, unit), weights):
        linear.weight.data = weight


def _values(model: nn.Module, tokens: Tensor, batch: int) -> Tensor:
    with torch.inference_mode():
        return torch.cat([model(input_ids=tokens[i:i + batch]).logits[..., 0].float()
                          for i in range(0, len(tokens), batch)])


def allocate(gains: dict[str, float], shapes: dict[str, tuple[int, int]], budget: float, base: ModuleQuant,
             probe: ModuleQuant = PROBE) -> list[str]:
    """The units raised to PROBE: best gain per added stored bit first, while the average stored bits per
    decoder Linear weight stays within BUDGET. SHAPES: [out, in] of each Linear by full module name."""
    def cost(unit: str, quant: ModuleQuant) -> float:
        layer, name = unit.split(".")
        total = 0.0
        for linear in UNITS[name][0]:
            out_f, in_f = shapes[f"model.layers.{layer}.{linear}"]
            total += out_f * in_f * quant.stored_bits(in_f)
        return total

    weights = sum(o * i for o, i in shapes.values())
    spent = sum(cost(u, base) for u in gains)
    if spent > budget * weights:
        raise InputError(f"--bits-budget {budget} is below the {spent / weights:.3f} stored bits per weight of "
                         f"{base.label} everywhere")
    extra = {u: cost(u, probe) - cost(u, base) for u in gains}
    chosen = []
    for unit in sorted(gains, key=lambda u: gains[u] / max(extra[u], 1.0), reverse=True):
        if gains[unit] > 0 and spent + extra[unit] <= budget * weights:
            chosen.append(unit)
            spent += extra[unit]
    return chosen


def dynamic_for(units: list[str], probe: ModuleQuant = PROBE) -> dict[str, dict[str, int]]:
    """A GPTQModel ``dynamic`` raising UNITS to PROBE: one ``+:`` key each, in layer order."""
    order = {u: i for i, u in enumerate(UNITS)}
    ordered = sorted(units, key=lambda u: (int(u.split(".")[0]), order[u.split(".")[1]]))
    return {f"+:model\\.layers\\.{u.split('.')[0]}\\.{UNITS[u.split('.')[1]][1]}":
            {"bits": probe.bits, "group_size": probe.group_size} for u in ordered}

