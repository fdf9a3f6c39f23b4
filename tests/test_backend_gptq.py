"""The int4 torch backend against the same model with its Linears replaced by the dequantized weights."""

from __future__ import annotations

import pytest
import torch

from vexport.backends.gptq import TRITON_MAX_TOKENS, GPTQRunner, QuantLinear, dequantize_packed, dequantized_linears
from vexport.backends.torch import TorchRunner
from vexport.batching import pad_batch
from vexport.export.rtn import write_rtn_checkpoint
from vexport.kernels.reference import int4_matmul_reference
from vexport.model import open_model
from vexport.parity import sqnr_db
from vexport.quant.checkpoint import quantize_rtn_act_order
from vexport.quant.pack import TENSOR_NAMES, dequantize_gptq_v1, pack_gptq_v1
from vexport.quant.reference import quantize_rtn
from vexport.runtime import load

CASES = {  # id: (model fixture, group size, desc_act, sym)
    "g32": ("tiny_model_dir", 32, False, True),
    "g32-act-asym": ("tiny_model_dir", 32, True, False),
    "gqa-g16-act": ("tiny_gqa_model_dir", 16, True, True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    fixture, group_size, desc_act, sym = CASES[request.param]
    model_dir = request.getfixturevalue(fixture)
    folder = write_rtn_checkpoint(model_dir, tmp_path_factory.mktemp("gptq") / request.param, group_size=group_size,
                                  sym=sym, desc_act=desc_act)
    return model_dir, folder


def dequantized_reference(model_dir, gptq_dir) -> TorchRunner:
    """The float model of the checkpoint: transformers' module holding the dequantized Linear weights and the
    checkpoint's float16 tensors, all in float32."""
    module = open_model(model_dir).load_torch(dtype=torch.float32)
    gptq = open_model(gptq_dir)
    state = {}
    for name in module.state_dict():
        prefix = name.removesuffix(".weight")
        if f"{prefix}.qweight" in gptq.tensors:
            packed = {t: gptq.read_tensor(f"{prefix}.{t}") for t in TENSOR_NAMES}
            state[name] = dequantize_gptq_v1(packed, dtype=torch.float32)
        else:
            state[name] = gptq.read_tensor(name).float()
    module.load_state_dict(state, strict=True)
    return TorchRunner(module)


def _random_batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, 23), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, :6] = 0
    return ids, mask


def test_matches_dequantized_reference(case):
    model_dir, folder = case
    runner = GPTQRunner(folder, device="cpu")
    ids, mask = _random_batch(runner.module.config.vocab_size)
    with dequantized_linears(runner.module):  # the float path; the packed int4 CPU one: tests/test_int4_cpu.py
        got = runner.logits(ids, mask)
    expected = dequantized_reference(model_dir, folder).logits(ids, mask)
    assert got.dtype == torch.float32 and got.shape == (3, 23, 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_quantization_error_is_modest(case):
    """int4 vs the float model it came from: the statistics regime, not a kernel tolerance."""
    model_dir, folder = case
    ids, mask = _random_batch(1000, seed=1)
    fp, q = load(model_dir).values(ids, mask), load(folder).values(ids, mask)
    real = mask.bool()
    assert sqnr_db(fp[real].numpy(), q[real].numpy()) > 10.0  # 13-18 dB measured on these random models


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_sequence_alone(case, side):
    model = load(case[1])
    texts = ["<|user|>\nHi\n<|assistant|>\nHello there, how can I help?", "Short.", "A middle sized sentence."]
    seqs = [model.tokenizer(t)["input_ids"] for t in texts]
    ids, mask = pad_batch(seqs, model.tokenizer.pad_token_id, side)
    got = model.values(ids, mask)
    for row, seq in enumerate(seqs):
        alone = model.values(torch.tensor([seq]))[0]
        torch.testing.assert_close(got[row][mask[row].bool()], alone, atol=2e-5, rtol=1e-4)


def test_load_surface(case):
    model = load(case[1])
    assert (model.format, model.precision, model.device.type) == ("gptq", "int4", "cpu")
    runner = model.runner
    assert runner.name == "gptq" and runner.dtype == torch.float32
    layers = runner.module.config.num_hidden_layers
    assert sum(isinstance(m, QuantLinear) for m in runner.module.modules()) == 7 * layers
    dense = [n for n, m in runner.module.named_modules() if isinstance(m, torch.nn.Linear)]
    assert dense == ["score"]
    assert not any(t.is_meta for t in runner.module.state_dict().values())
    ids = torch.tensor([[1, 7, 8, 9]])
    with torch.inference_mode():  # backbone and head called apart, as KV-cached decoding will
        hidden = runner.module.model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(runner.module.score(hidden), runner.logits(ids, torch.ones_like(ids)))


def _quant_linear(in_f: int, out_f: int, group_size: int, bias: bool, seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=gen)
    b = torch.randn(out_f, generator=gen) if bias else None
    return QuantLinear.from_packed(pack_gptq_v1(quantize_rtn(weight, 4, group_size, sym=False)), b)


@pytest.mark.parametrize("shape, in_f, out_f, group_size, bias",
                         [((5, 3), 96, 40, 32, True), ((1, 7), 160, 24, 64, False), ((2,), 64, 8, -1, True)])
def test_quant_linear_cpu_is_dequantize_then_matmul(shape, in_f, out_f, group_size, bias):
    layer = _quant_linear(in_f, out_f, group_size, bias)
    x = torch.randn(*shape, in_f)
    weight = dequantize_gptq_v1(layer.packed(), dtype=torch.float32)
    expected = x @ weight.T + (layer.bias if bias else 0)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sym", "asym", "positive", "act-order"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_packed_equals_reference(kind, dtype):
    """The runtime's lean dequantization gives exactly the numbers of quant/pack.py's reference."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 160, generator=gen)
    if kind == "positive":  # asym groups with zero point 0: the v1 borrow case of FORMATS.md
        qw = quantize_rtn(weight.abs(), 4, 32, sym=False)
        assert int(qw.zeros.min()) == 0
    elif kind == "act-order":
        qw = quantize_rtn_act_order(weight, 64, sym=False)
    else:
        qw = quantize_rtn(weight, 4, 64, sym=kind == "sym")
    packed = pack_gptq_v1(qw)
    assert torch.equal(dequantize_packed(**packed, dtype=dtype), dequantize_gptq_v1(packed, dtype=dtype))


def test_quant_linear_triton_path_under_interpreter():
    """The CUDA small-batch path's kernel, run by the Triton interpreter on CPU tensors (TRITON_INTERPRET=1)."""
    layer = _quant_linear(96, 40, 32, bias=True)
    x = torch.randn(2, 3, 96)
    expected = int4_matmul_reference(x.reshape(-1, 96), **layer.packed(), bias=layer.bias).reshape(2, 3, 40)
    torch.testing.assert_close(layer._forward_triton(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_paths(tiny_model_dir, tmp_path):
    """float16 on CUDA: Triton for <= TRITON_MAX_TOKENS rows, dequantize + cuBLAS above, both against the
    dequantized reference; the whole model against the CPU float32 runner."""
    layer = _quant_linear(192, 64, 32, bias=True).to("cuda")
    layer.bias = layer.bias.half()
    for rows in (TRITON_MAX_TOKENS, TRITON_MAX_TOKENS + 1):
        x = torch.randn(rows, 192, device="cuda", dtype=torch.float16)
        expected = int4_matmul_reference(x, **layer.packed(), bias=layer.bias)
        torch.testing.assert_close(layer(x), expected, atol=2e-2, rtol=2e-2)
    folder = write_rtn_checkpoint(tiny_model_dir, tmp_path / "gptq", group_size=32, desc_act=True)
    gpu, cpu = GPTQRunner(folder), GPTQRunner(folder, device="cpu")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float16
    for length in (8, 40):  # 2 x 8 rows: Triton; 2 x 40 rows: cuBLAS
        ids = torch.randint(4, 1000, (2, length))
        mask = torch.ones_like(ids)
        got = gpu.logits(ids, mask).float().cpu().ravel().numpy()
        assert sqnr_db(cpu.logits(ids, mask).ravel().numpy(), got) > 35
