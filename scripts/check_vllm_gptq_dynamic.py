"""Parse a vexport GPTQ checkpoint's ``dynamic`` with vLLM's own GPTQ config and compare, per module, the bits and
group size vLLM resolves with what vexport wrote (and reads back).

vLLM is not a vexport dependency and is never vendored: fetch its wheel and the few pure-Python modules its
quantization package imports, outside the project's environment, then point this script at them:

    pip download --no-deps vllm -d /tmp/vllm && (cd /tmp/vllm && unzip -q vllm-*.whl 'vllm/*' -x '*.so' -d site)
    pip install --no-deps --target /tmp/vllm/deps pyzmq pybase64 cachetools cbor2 msgspec cloudpickle \\
        py-cpuinfo llguidance xgrammar apache-tvm-ffi compressed-tensors loguru
    python scripts/check_vllm_gptq_dynamic.py CHECKPOINT --vllm-path /tmp/vllm/site --vllm-path /tmp/vllm/deps

(An installed vllm is used as is.) The config class is the one vLLM maps ``quant_method: gptq`` to
(its ``override_quantization_method`` claims ``gptq``); each module is resolved with vLLM's ``get_dynamic_override`` (False:
skipped, left unquantized) and ``override_config`` on a copy of the config, as its ``get_linear_quant_method``
does. vLLM's Llama fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` and resolves those fused
names, so they are checked too: each must resolve to what vexport wrote for every one of its parts.

Exit 0: every module agrees; 1: some disagree, or vLLM refuses the config (the reason is printed); 2: bad input.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a GPTQ folder (config.json with quantization_config)")
    parser.add_argument("--vllm-path", action="append", default=[], type=Path,
                        help="a folder to import vllm (or its dependencies) from; repeat for several")
    args = parser.parse_args()
    qconfig, layers = _read_checkpoint(args.checkpoint)
    if qconfig is None:
        return 2
    sys.path[:0] = [str(p) for p in args.vllm_path]
    config_cls, utils = _vllm()
    if config_cls is None:
        return 2
    try:
        vllm_config = config_cls.from_config(qconfig)
    except ValueError as exc:  # vLLM refuses the checkpoint's settings
        print(f"vLLM {config_cls.__name__} refuses this quantization_config: {exc}")
        return 1
    ours = _vexport_plan(qconfig, layers)
    rows = _compare(vllm_config, utils, ours)
    print(f"{'module':<40} {'vexport wrote':>14} {'vLLM resolves':>14}")
    for name, wrote, resolved in rows:
        print(f"{name:<40} {wrote:>14} {resolved:>14}{'' if wrote == resolved else '   <-- differs'}")
    differ = sum(wrote != resolved for _, wrote, resolved in rows)
    print(f"{len(rows)} modules ({config_cls.__name__} from vllm {_vllm_version()}): "
          f"{'all agree' if not differ else f'{differ} differ'}")
    return 1 if differ else 0


def _read_checkpoint(folder: Path) -> tuple[dict | None, int]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        print(f"{folder / 'config.json'}: cannot be read as JSON ({type(exc).__name__})", file=sys.stderr)
        return None, 0
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "gptq":
        print(f"{folder / 'config.json'}: no GPTQ quantization_config", file=sys.stderr)
        return None, 0
    return qconfig, int(config["num_hidden_layers"])


CONFIG_CLASSES = (("vllm.model_executor.layers.quantization.auto_gptq", "AutoGPTQConfig"),  # vLLM >= 0.2x
                  ("vllm.model_executor.layers.quantization.gptq", "GPTQConfig"))  # earlier vLLM


def _vllm():
    """vLLM's GPTQ config class (only its own module is imported: ``get_quantization_config`` would import every
    quantization method vLLM has) and its gptq_utils; the class must claim ``quant_method: gptq``."""
    import importlib

    for module, name in CONFIG_CLASSES:
        try:
            config_cls = getattr(importlib.import_module(module), name)
            from vllm.model_executor.layers.quantization.utils import gptq_utils
        except ImportError as exc:
            error = exc
            continue
        claims = config_cls.override_quantization_method({"quant_method": "gptq"}, None) \
            if hasattr(config_cls, "override_quantization_method") else config_cls.get_name()
        if claims in (config_cls.get_name(), "gptq"):
            return config_cls, gptq_utils
    print(f"vllm's GPTQ config cannot be imported ({error}); see this script's docstring for --vllm-path",
          file=sys.stderr)
    return None, None


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:
        import vllm

        return getattr(vllm, "__version__", "?")


def _vexport_plan(qconfig: dict, layers: int) -> dict[str, str]:
    """What vexport resolves (and its readers load) per Linear: ``4g128``, ``8g32`` or ``fp16``."""
    from vexport.quant.checkpoint import gptq_options, module_plan
    from vexport.quant.dynamic import FLOAT16_LABEL

    plan = module_plan(gptq_options({"quantization_config": qconfig}), layers)
    return {name: FLOAT16_LABEL if quant is None else quant.label for name, quant in plan.items()}


def _vllm_label(config, utils, prefix: str) -> str:
    """vLLM's own resolution of PREFIX, as its get_linear_quant_method does it."""
    if utils.get_dynamic_override(config, layer_name=prefix) is False:
        return "fp16"
    resolved = copy.deepcopy(config)
    utils.override_config(resolved, prefix=prefix)
    return f"{resolved.weight_bits}g{resolved.group_size}"


def _compare(config, utils, ours: dict[str, str]) -> list[tuple[str, str, str]]:
    """(module, vexport, vLLM) for every checkpoint Linear, then for every fused name vLLM's Llama uses."""
    rows = [(name, label, _vllm_label(config, utils, name)) for name, label in ours.items()]
    for name in ours:
        for fused, parts in FUSED.items():
            if name.endswith("." + parts[0]):
                stem = name[: -len(parts[0])]
                wrote = {ours[stem + p] for p in parts}
                rows.append((stem + fused, "/".join(sorted(wrote)), _vllm_label(config, utils, stem + fused)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
