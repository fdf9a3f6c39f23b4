"""CUDA paths: the fp16 reference on the GPU and ONNX Runtime's CUDA provider with I/O binding.

Marked `gpu`: they skip with the reason on a machine without a CUDA GPU (CI), and run where one is lent.
"""

from __future__ import annotations

import pytest
import torch

from vexport.checker import check
from vexport.export.onnx import export_onnx
from vexport.parity import sqnr_db
from vexport.runtime import load

pytestmark = pytest.mark.gpu

IDS = torch.tensor([[1, 7, 8, 9, 10, 11], [1, 20, 30, 40, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def test_reference_is_fp16_on_cuda(tiny_model_dir):
    gpu, cpu = load(tiny_model_dir), load(tiny_model_dir, device="cpu")
    assert gpu.device.type == "cuda" and gpu.precision == "float16"
    values = gpu.values(IDS, MASK)
    assert values.device.type == "cuda" and values.dtype == torch.float32
    expected = cpu.values(IDS, MASK)
    assert sqnr_db(expected[MASK.bool()].numpy(), values.cpu()[MASK.bool()].numpy()) > 35


def test_onnxruntime_cuda_io_binding(tiny_model_dir, tmp_path):
    if not _cuda_provider():
        pytest.skip("needs onnxruntime-gpu (the CUDA execution provider is not installed)")
    folder = export_onnx(tiny_model_dir, tmp_path / "onnx16", "float16")
    gpu, cpu = load(folder, device="cuda"), load(folder, device="cpu")
    ids, mask = IDS.cuda(), MASK.cuda()
    logits = gpu(input_ids=ids, attention_mask=mask).logits
    assert logits.device.type == "cuda" and logits.shape == (2, 6, 1)
    torch.testing.assert_close(logits.cpu()[MASK.bool()], cpu(input_ids=IDS, attention_mask=MASK).logits[MASK.bool()],
                               atol=5e-3, rtol=5e-3)


def test_check_uses_fp16_cuda_reference(tiny_model_dir, tmp_path):
    folder = export_onnx(tiny_model_dir, tmp_path / "onnx32", "float32")
    outcome = check(folder, tiny_model_dir, device="cuda" if _cuda_provider() else None)
    assert outcome.report["reference"]["device"].startswith("cuda")
    assert outcome.report["reference"]["dtype"] == "float16"
    assert outcome.result.sqnr_db > 35
