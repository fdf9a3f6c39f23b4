"""GPTQ int4 export: calibration → streaming GPTQ (float targets) → value-aware head → GPTQ v1 checkpoint.

``GPTQOptions.dynamic`` (a per-module plan, GPTQModel's ``dynamic``) is checked for every decoder Linear before
any work, written into ``quantization_config`` and quantize_config.json as given, and the manifest records the
allocation it resolves to (``format_options.allocation``: labels per module type and layer, average bits).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from vexport.artifact import check_output, staging_dir
from vexport.errors import VexportError
from vexport.export.common import copy_support_files, value_io_spec, write_manifest
from vexport.model import ModelSource, open_model
from vexport.quant.dynamic import allocation, check_plan_entry, vllm_fusion_conflicts
from vexport.quant.pack import per_word
from vexport.quant.stream import GPTQOptions, quantize_stream
from vexport.quant.value_aware import Head, choose_and_fit, rms_norm

log = logging.getLogger(__name__)

# Calibration windows the --bits-budget probes run on (each of the 4 L + 2 probes is one forward over them)
SENSITIVITY_WINDOWS = 16


def export_gptq(model: str | os.PathLike, output: str | os.PathLike, options: GPTQOptions = GPTQOptions(), *,
                value_calibration: bool = True, calibration: str | os.PathLike | None = None, samples: int = 128,
                seq_len: int = 512, seed: int = 0, device: str | None = None, force: bool = False,
                allow_pickle: bool = False, progress: bool = False, bits_budget: float | None = None) -> Path:
    """Quantize every decoder Linear of MODEL to int4 with GPTQ and write a GPTQ v1 checkpoint to OUTPUT.

    ``bits_budget`` (average stored bits per decoder Linear weight) allocates 8-bit g32 to the Linear groups
    whose value sensitivity pays most per bit (quant/sensitivity.py), as a ``dynamic`` plan."""
    from vexport.calibration import calibration_samples
    from vexport.quant.checkpoint import ShardWriter, gptq_quantization_config, write_gptq_config

    output = Path(output)
    check_output(output, force, inputs=(model, calibration))
    _check_options(options)
    source = open_model(model, allow_pickle=allow_pickle)
    if source.pickle:
        raise VexportError(f"{source.path}: GPTQ export streams safetensors shards; convert the pickle weights first")
    if bits_budget is not None and options.dynamic:
        raise VexportError("--bits-budget chooses the per-module plan itself: give it or --dynamic, not both")
    if bits_budget is not None and not (isinstance(bits_budget, (int, float)) and 0 < bits_budget < 64):
        raise VexportError(f"--bits-budget {bits_budget} must be a number of bits per weight, e.g. 4.6")
    alloc = _allocation(source, options)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens = calibration_samples(_tokenizer(source), path=calibration, samples=samples, seq_len=seq_len, seed=seed,
                                 max_length=source.config.max_position_embeddings)
    if bits_budget is not None:
        options, sensitivity = _budget_plan(source, tokens, options, bits_budget, device)
        alloc = {**_allocation(source, options), "sensitivity": sensitivity}
    qconfig = gptq_quantization_config(options.bits, options.group_size, options.desc_act, options.sym,
                                       options.dynamic)
    if value_calibration:  # each Linear fitted to the float model's outputs, then the head refit
        options = dataclasses.replace(options, float_targets=True)
    with staging_dir(output, force) as tmp:
        writer = ShardWriter(tmp)
        stream = quantize_stream(source, tokens, options, writer.add, device=device,
                                 keep_reference=value_calibration, progress=progress)
        head, fit = _head(source, stream, tokens.shape[0], value_calibration)
        writer.add(head)
        writer.finish()
        copy_support_files(source.path, tmp)
        write_gptq_config(tmp, source.config, qconfig)
        opts = {**qconfig, "weights": "model.safetensors.index.json", "damp_percent": options.damp_percent,
                # [key, overrides] pairs: the manifest's objects are written with sorted keys, and first match wins
                **({"dynamic": [[k, v] for k, v in qconfig["dynamic"].items()]} if "dynamic" in qconfig else {}),
                "calibration": {"source": str(calibration) if calibration else "builtin", "samples": samples,
                                "seq_len": seq_len, "seed": seed, "digest": _digest(calibration)},
                "value_calibration": {**fit, "float_targets": options.float_targets}, "allocation": alloc,
                "seconds_per_layer": [round(s, 2) for s in stream.seconds_per_layer]}
        write_manifest(tmp, "gptq", "int4", source, value_io_spec(), opts, progress)
    return output


def _digest(calibration) -> str:
    """Fingerprint of the calibration text: the built-in corpus reads the running Python's standard library."""
    from vexport.calibration import calibration_digest, calibration_texts

    return calibration_digest(calibration_texts(calibration))


def _check_options(options: GPTQOptions) -> None:
    if options.bits not in (4, 8):
        raise VexportError(f"--bits {options.bits} is not supported: GPTQ export writes 4- or 8-bit checkpoints")
    if options.group_size != -1 and (options.group_size < 8 or options.group_size % 8):
        raise VexportError(f"--group-size {options.group_size} must be -1 (per channel) or a multiple of 8")


def _budget_plan(source: ModelSource, tokens, options: GPTQOptions, budget: float, device) -> tuple[GPTQOptions, dict]:
    """OPTIONS with the ``dynamic`` plan BUDGET allows (RTN value-sensitivity probes on the calibration windows),
    and what the manifest records of it."""
    from vexport.quant.checkpoint import linear_prefixes
    from vexport.quant.sensitivity import PROBE, allocate, dynamic_for, value_sensitivity

    model = source.load_torch(dtype=torch.float32).to(device).eval()
    baseline, gains = value_sensitivity(model, tokens[:SENSITIVITY_WINDOWS].to(device), options.base)
    del model
    shapes = {prefix: tuple(source.tensors[f"{prefix}.weight"][2])
              for layer in range(source.config.num_hidden_layers) for prefix in linear_prefixes(layer)}
    raised = allocate(gains, shapes, budget, options.base)
    log.info("--bits-budget %s: %d of %d Linear groups at %s", budget, len(raised), len(gains), PROBE.label)
    record = {"bits_budget": budget, "probe": PROBE.label, "rtn_value_sqnr_db": round(baseline, 3),
              "gain_db": {unit: round(gain, 3) for unit, gain in gains.items()}, "raised": raised}
    return dataclasses.replace(options, dynamic=dynamic_for(raised) or None), record


def _allocation(source: ModelSource, options: GPTQOptions) -> dict:
    """The settings every decoder Linear resolves to, checked before any work (a module the readers or the
    packing cannot take is refused by name); a plan vLLM cannot serve (q/k/v or gate/up apart) is warned about."""
    from vexport.quant.checkpoint import linear_prefixes

    plan, shapes = {}, {}
    for layer in range(source.config.num_hidden_layers):
        for prefix in linear_prefixes(layer):
            quant = plan[prefix] = options.module_quant(prefix)
            out_f, in_f = shapes[prefix] = tuple(source.tensors[f"{prefix}.weight"][2])
            if quant is None:
                continue
            check_plan_entry(quant, prefix, "--dynamic")
            if in_f % per_word(quant.bits) or out_f % per_word(quant.bits):
                raise VexportError(f"--dynamic: {prefix} [{out_f}, {in_f}] cannot be packed at {quant.bits} bits "
                                   f"(both sizes must be multiples of {per_word(quant.bits)})")
    conflicts = vllm_fusion_conflicts(plan, options.dynamic, options.base)
    if conflicts:
        log.warning("--dynamic: vLLM fuses q/k/v and gate/up and resolves the fused name (%s%s), which this plan "
                    "gives other settings than its parts: vLLM cannot load this checkpoint", conflicts[0],
                    f" and {len(conflicts) - 1} more" if len(conflicts) > 1 else "")
    return allocation(plan, shapes)


def _tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path)
    except Exception as exc:
        raise VexportError(f"{source.path}: its tokenizer cannot be loaded ({type(exc).__name__}); "
                           "calibration text needs it") from None


def _head(source: ModelSource, stream, windows: int, value_calibration: bool) -> tuple[dict, dict]:
    """Final norm and score head in float16; with value calibration, the head refit on calibration text."""
    norm = source.read_tensor("model.norm.weight").float()
    weight = source.read_tensor("score.weight").float()
    bias = source.read_tensor("score.bias").float() if source.score_has_bias else torch.zeros(1)
    head, fit = Head(weight, bias), {"enabled": value_calibration}
    if value_calibration:
        eps = source.config.rms_norm_eps
        features = rms_norm(stream.hidden_quantized.float(), norm, eps).flatten(0, 1).cpu()
        target = head.values(rms_norm(stream.hidden_reference.float(), norm, eps).flatten(0, 1).cpu())
        head, mode, scores = choose_and_fit(features, target, head, windows)
        fit.update({"head_fit": mode, "held_apart_calibration_sqnr_db": {k: round(v, 3) for k, v in scores.items()}})
    tensors = {"model.norm.weight": norm.half(), "score.weight": head.weight.half(), "score.bias": head.bias.half()}
    return tensors, fit
