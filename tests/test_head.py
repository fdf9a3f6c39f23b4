"""vexport/head.py: the torch runners' value head, fused (Triton; under the interpreter on the CPU) or HF's."""

from __future__ import annotations

import pytest
import torch

from vexport.backends.torch import TorchRunner, position_ids
from vexport.head import ValueHead, last_token_index, prenorm_backbone
from vexport.runtime import load

IDS = torch.tensor([[1, 7, 8, 9, 10, 11], [1, 20, 30, 40, 0, 0], [0, 0, 0, 5, 6, 7]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]])


def test_prenorm_backbone_shares_weights_and_skips_only_the_norm(tiny_model_dir):
    module = load(tiny_model_dir).runner.module
    backbone = prenorm_backbone(module)
    assert isinstance(module.model.norm, type(backbone.layers[0].input_layernorm))  # the module is untouched
    assert backbone.embed_tokens.weight is module.model.embed_tokens.weight
    with torch.no_grad():
        pre = backbone(input_ids=IDS, attention_mask=MASK, position_ids=position_ids(MASK)).last_hidden_state
        post = module.model(input_ids=IDS, attention_mask=MASK, position_ids=position_ids(MASK)).last_hidden_state
    torch.testing.assert_close(module.model.norm(pre), post)


def test_last_token_index_any_padding_side():
    assert last_token_index(MASK).tolist() == [5, 6 + 3, 12 + 5]
    assert last_token_index(torch.zeros(1, 4, dtype=torch.long)).tolist() == [0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_head_matches_hugging_face_model(tiny_model_dir, dtype):
    """The fused kernel (interpreter) on the tiny model against the HF module's logits."""
    model = load(tiny_model_dir, dtype=dtype)
    fused = ValueHead(model.runner.module, fused=True)
    assert fused.backbone.norm is not model.runner.module.model.norm
    with torch.inference_mode():
        values = fused.values(IDS, MASK, position_ids(MASK))
        logits = model.runner.logits(IDS, MASK)[..., 0].float()
        last = fused.values(IDS, MASK, position_ids(MASK), index=last_token_index(MASK))
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: HF rounds the value to bf16 (scale ~1)
    torch.testing.assert_close(values[MASK.bool()], logits[MASK.bool()], atol=tol, rtol=tol)
    torch.testing.assert_close(last, values.reshape(-1)[last_token_index(MASK)])


def test_sequence_values_run_the_head_at_last_tokens_only(tiny_model_dir):
    model = load(tiny_model_dir)
    assert isinstance(model.runner, TorchRunner) and not model.runner.head.fused  # CPU: the HF head
    values = model.values(IDS, MASK)
    assert torch.all(values[~MASK.bool()] == 0)
    expected = torch.stack([values[0, 5], values[1, 3], values[2, 5]])
    torch.testing.assert_close(model.sequence_values(IDS, MASK), expected)
    alone = model.sequence_values(torch.tensor([[1, 20, 30, 40]]), None)
    torch.testing.assert_close(alone, expected[1:2], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_reference_uses_fused_head(tiny_model_dir):
    gpu, cpu = load(tiny_model_dir), load(tiny_model_dir, device="cpu")
    assert gpu.runner.head.fused
    torch.testing.assert_close(gpu.values(IDS, MASK).cpu(), cpu.values(IDS, MASK), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gpu.sequence_values(IDS, MASK).cpu(), cpu.sequence_values(IDS, MASK),
                               atol=2e-2, rtol=2e-2)
