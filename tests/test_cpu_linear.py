"""oneDNN-packed Linears (backends/cpu_linear.py) against plain F.linear and the unpacked reference model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vexport.backends.cpu_linear import PackedLinear, available, pack_linears
from vexport.runtime import load

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN (mkldnn)")


@pytest.mark.parametrize("shape", [(1, 48), (4, 48), (3, 17, 48), (2, 1, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(*shape)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed.reference(x), linear(x))
    torch.testing.assert_close(packed.weight, linear.weight.detach())


def test_load_packs_decoder_linears_and_keeps_the_values(tiny_gqa_model_dir):
    fast = load(tiny_gqa_model_dir, device="cpu")
    plain = load(tiny_gqa_model_dir, device="cpu", cpu_kernels="torch")
    fast_layers = fast.runner.module.model.layers
    linears = [m for m in fast_layers[0].modules() if isinstance(m, (nn.Linear, PackedLinear))]
    assert len(linears) == 7 and all(isinstance(m, PackedLinear) for m in linears)
    assert not any(isinstance(m, PackedLinear) for m in plain.runner.module.modules())
    assert type(fast.runner.module.score) is nn.Linear  # the head is left to ValueHead
    ids = torch.randint(5, 200, (3, 23))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    torch.testing.assert_close(fast.values(ids, mask), plain.values(ids, mask), atol=1e-5, rtol=1e-4)


def test_pack_linears_leaves_non_float32_alone(tiny_gqa_model_dir):
    model = load(tiny_gqa_model_dir, device="cpu", dtype="bfloat16")
    assert pack_linears(model.runner.module) == 0


def test_unknown_cpu_kernels_is_refused(tiny_gqa_model_dir):
    from vexport.errors import InputError

    with pytest.raises(InputError, match="cpu_kernels"):
        load(tiny_gqa_model_dir, cpu_kernels="mkl")


def test_masked_gqa_attention_keeps_kv_heads_and_the_values(tiny_gqa_model_dir):
    """vexport_sdpa (backends/cpu_attention.py): the cached, masked calls of score_group and sessions give the
    values of plain transformers."""
    fast = load(tiny_gqa_model_dir, device="cpu")
    plain = load(tiny_gqa_model_dir, device="cpu", cpu_kernels="torch")
    assert fast.runner.module.config._attn_implementation == "vexport_sdpa"
    assert plain.runner.module.config._attn_implementation == "sdpa"
    prompt, responses = torch.randint(5, 200, (17,)), [[7, 8, 9, 10], [11], [12, 13]]
    for got, want in zip(fast.score_group(prompt, responses), plain.score_group(prompt, responses)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    session, reference = fast.session(prompt), plain.session(prompt)
    candidates = torch.tensor([3, 4, 5])
    torch.testing.assert_close(session.score(candidates), reference.score(candidates), atol=1e-5, rtol=1e-4)
