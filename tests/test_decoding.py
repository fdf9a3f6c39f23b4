"""Sessions, shared-prompt scoring and KV-cached calls against full recomputation, on the fp reference (MHA and
GQA) and the GPTQ int4 runtime (against its own full recomputation)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoConfig, DynamicCache, LlamaForCausalLM

from vexport.decoding import Session, ValueOutputWithPast
from vexport.errors import InputError
from vexport.export.rtn import write_rtn_checkpoint
from vexport.runtime import load

ATOL = 1e-4  # float32, the same for the int4 runtime against its own full recomputation
MODELS = ["fp", "fp-gqa", "int4-gqa"]


@pytest.fixture(scope="module")
def gptq_dir(tiny_gqa_model_dir, tmp_path_factory):
    return write_rtn_checkpoint(tiny_gqa_model_dir, tmp_path_factory.mktemp("gptq") / "g16", group_size=16)


@pytest.fixture(scope="module", params=MODELS)
def model(request, tiny_model_dir, tiny_gqa_model_dir):
    if request.param == "int4-gqa":
        return load(request.getfixturevalue("gptq_dir"))
    return load(tiny_model_dir if request.param == "fp" else tiny_gqa_model_dir)


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 1000, shape, generator=torch.Generator().manual_seed(seed))


def full_last(model, prefix: torch.Tensor, chunk) -> float:
    """The value at the last token of ``prefix + chunk``, recomputed from scratch."""
    return float(model.values(torch.cat([prefix, torch.as_tensor(chunk)])[None])[0, -1])


@contextlib.contextmanager
def backbone_calls(model):
    """Counts the forwards of the model's backbone inside the block (a real forward hook, removed after)."""
    calls: list = []
    hook = model.runner.module.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


def test_backends_under_test(model):
    assert model.runner.name in ("torch", "gptq")
    if model.runner.name == "gptq":
        assert type(model.runner.module.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"


def test_prompt_values_equal_full(model):
    prompt = ids(13)
    session = model.session(prompt)
    assert session.values.dtype == torch.float32 and session.values.shape == (13,)
    torch.testing.assert_close(session.values, model.values(prompt[None])[0], atol=ATOL, rtol=0)


def test_score_next_tokens(model):
    prompt, candidates = ids(11, seed=1), torch.tensor([5, 9, 300, 999, 5])
    values = model.session(prompt).score(candidates)
    assert values.shape == (5,) and values.dtype == torch.float32
    expected = torch.tensor([full_last(model, prompt, [c]) for c in candidates.tolist()])
    torch.testing.assert_close(values, expected, atol=ATOL, rtol=0)
    assert values[0] == pytest.approx(float(values[4]), abs=ATOL)  # the same token twice: the same value


def test_score_chunks_of_unequal_length(model):
    prompt = ids(9, seed=2)
    chunks = [[5, 6, 7, 8], [9], [300, 301], [7, 7, 7]]
    values = model.session(prompt).score(chunks)
    expected = torch.tensor([full_last(model, prompt, c) for c in chunks])
    torch.testing.assert_close(values, expected, atol=ATOL, rtol=0)


def test_advance_reuses_a_scored_candidate(model):
    prompt = ids(10, seed=3)
    session = model.session(prompt)
    chunks = [[11, 12, 13], [40], [50, 51]]
    with backbone_calls(model) as calls:
        session.score(chunks)
        appended = session.advance([50, 51])
    assert len(calls) == 1, "advancing with a scored candidate must not run the model again"
    full = model.values(torch.cat([prompt, torch.tensor([50, 51])])[None])[0]
    torch.testing.assert_close(session.values, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(appended, full[-2:], atol=ATOL, rtol=0)
    with backbone_calls(model) as calls:
        session.advance([7, 8])  # not a candidate: runs
    assert len(calls) == 1
    torch.testing.assert_close(session.values, model.values(session.tokens[None])[0], atol=ATOL, rtol=0)


def test_many_steps_equal_full_recomputation(model):
    prompt = ids(8, seed=4)
    session = model.session(prompt)
    generator = torch.Generator().manual_seed(5)
    for step in range(6):
        width = 1 + step % 3
        chunks = [torch.randint(4, 1000, (1 + (k + step) % width,), generator=generator).tolist() for k in range(3)]
        session.score([[1, 2, 3], [4]])  # scored and then replaced: only the last scoring counts
        values = session.score(chunks)
        expected = torch.tensor([full_last(model, session.tokens, c) for c in chunks])
        torch.testing.assert_close(values, expected, atol=ATOL, rtol=0)
        session.advance(chunks[step % 3] if step != 4 else [17])
    assert session.tokens.shape == session.values.shape
    torch.testing.assert_close(session.values, model.values(session.tokens[None])[0], atol=ATOL, rtol=0)


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    prompts = ids(3, 9, seed=6)
    mask = torch.ones_like(prompts)
    mask[1, :4] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    return prompts, mask


def test_batched_prompts(model):
    prompts, mask = padded_prompts()
    session = model.session(prompts, mask)
    torch.testing.assert_close(session.values, model.values(prompts, mask), atol=ATOL, rtol=0)
    chunks = [[[1, 2], [3], [4, 5, 6]], [[7], [8, 9], [10]], [[11, 12, 13, 14], [15], [16]]]
    values = session.score(chunks)
    assert values.shape == (3, 3)
    for b in range(3):
        real = prompts[b][mask[b].bool()]
        expected = torch.tensor([full_last(model, real, c) for c in chunks[b]])
        torch.testing.assert_close(values[b], expected, atol=ATOL, rtol=0)
    session.advance([[3], [8, 9], [11, 12, 13, 14]])  # reused, rows of different lengths
    session.advance(torch.tensor([[20, 21], [22, 23], [24, 25]]))
    assert session.tokens.shape == session.values.shape == session.attention_mask.shape
    torch.testing.assert_close(session.values, model.values(session.tokens, session.attention_mask), atol=ATOL,
                               rtol=0)
    values = session.score(torch.tensor([[30, 31], [32, 33], [34, 35]]))  # [B, K] next tokens
    for b in range(3):
        real = session.tokens[b][session.attention_mask[b].bool()]
        assert float(values[b, 1]) == pytest.approx(full_last(model, real, [31 + 2 * b]), abs=ATOL)


def test_score_group_equals_full(model):
    prompt = ids(12, seed=7)
    responses = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    values = model.score_group(prompt, responses)
    assert [v.shape[0] for v in values] == [3, 1, 5, 2]
    for response, value in zip(responses, values):
        full = model.values(torch.cat([prompt, torch.tensor(response)])[None])[0, len(prompt):]
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, full, atol=ATOL, rtol=0)
    as_tensor = model.score_group(prompt[None], torch.tensor([[5, 6, 7], [14, 15, 16]]))
    torch.testing.assert_close(as_tensor[0], values[0], atol=ATOL, rtol=0)


def test_cached_calls_like_a_causal_lm(model, tiny_model_dir):
    """Incremental calls as a Hugging Face decoding loop makes them (prepare_inputs_for_generation)."""
    config = AutoConfig.from_pretrained(tiny_model_dir)
    policy = LlamaForCausalLM(config).eval()  # only its prepare_inputs_for_generation is used
    sequence = ids(2, 7, seed=8)
    mask = torch.ones_like(sequence)
    mask[0, :3] = 0
    cache = DynamicCache(config=model.config)
    inputs = policy.prepare_inputs_for_generation(sequence, cache=cache, attention_mask=mask, use_cache=True,
                                                  is_first_iteration=True)
    for step in range(4):
        out = model(**inputs)
        assert isinstance(out, ValueOutputWithPast) and out.past_key_values is cache
        assert out.logits.shape == (2, inputs["input_ids"].shape[1], 1)
        torch.testing.assert_close(out.logits[:, -1], model(input_ids=sequence, attention_mask=mask).logits[:, -1],
                                   atol=ATOL, rtol=0)
        sequence = torch.cat([sequence, ids(2, 1, seed=20 + step)], dim=1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        inputs = policy.prepare_inputs_for_generation(sequence, cache=out.past_key_values, attention_mask=mask,
                                                      use_cache=True, next_sequence_length=1)


def test_cached_call_with_the_old_argument_name(model):
    sequence = ids(1, 6, seed=9)
    out = model(input_ids=sequence[:, :4], attention_mask=torch.ones(1, 4), use_cache=True)
    out = model(input_ids=sequence[:, 4:], attention_mask=torch.ones(1, 6), past_key_values=out.past_key_values,
                use_cache=True)
    assert out.cache.get_seq_length() == 6
    torch.testing.assert_close(out.logits[0, :, 0], model.values(sequence)[0, 4:], atol=ATOL, rtol=0)


def test_plain_calls_are_unchanged(tiny_model_dir):
    model = load(tiny_model_dir)
    out = model(input_ids=ids(2, 5), use_cache=False, return_dict=True)
    assert out.logits.shape == (2, 5, 1) and not hasattr(out, "cache")


@pytest.mark.parametrize("call, message", [
    (lambda m: m.session(torch.tensor([1.0, 2.0])), "integer tensor"),
    (lambda m: m.session(torch.tensor([1, 5000])), "outside the vocabulary"),
    (lambda m: m.session(torch.tensor([1, 2])).score([[1], []]), "empty"),
    (lambda m: m.session(torch.tensor([1, 2])).score(torch.tensor([[[1]]])), "[K] tokens or [K, c] chunks"),
    (lambda m: m.session(torch.tensor([1, 2])).advance([2000]), "outside the vocabulary"),
    (lambda m: m.session(torch.ones(2, 3, dtype=torch.long)).score([[[1]], [[2], [3]]]), "same number"),
    (lambda m: m.session(torch.ones(2, 3, dtype=torch.long)).advance([[1]]), "1 rows, the session has 2"),
    (lambda m: m.session(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]])), "real token"),
    (lambda m: m.session(torch.ones(500, dtype=torch.long)).score([[1] * 20]), "max_position_embeddings"),
    (lambda m: m.score_group(torch.ones(2, 3, dtype=torch.long), [[1]]), "one prompt"),
    (lambda m: m(input_ids=torch.ones(1, 1, dtype=torch.long), attention_mask=torch.ones(1, 1),
                 past_key_values=m(input_ids=torch.ones(1, 3, dtype=torch.long), use_cache=True).past_key_values),
     "must cover the cached and the new tokens"),
    (lambda m: m(input_ids=torch.ones(1, 1, dtype=torch.long), past_key_values=((1, 2),)), "transformers Cache"),
])
def test_bad_input_is_one_line(tiny_model_dir, call, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        call(load(tiny_model_dir))
    assert "\n" not in str(error.value)


def test_onnx_models_name_the_backends_with_sessions(tiny_model_dir, tmp_path):
    from vexport.export.onnx import export_onnx

    model = load(export_onnx(tiny_model_dir, tmp_path / "onnx"))
    for call in (lambda: model.session(torch.tensor([1, 2, 3])), lambda: model.score_group(torch.tensor([1]), [[2]]),
                 lambda: model(input_ids=torch.ones(1, 2, dtype=torch.long), past_key_values=DynamicCache())):
        with pytest.raises(InputError, match=r"torch-backed model \(backends: torch, gptq\); this model runs on onnx"):
            call()
    out = model(input_ids=torch.ones(1, 2, dtype=torch.long), use_cache=True)  # asked for, not passed: ignored
    assert out.logits.shape == (1, 2, 1)


def test_session_repr_and_type(model):
    session = model.session(ids(2, 4))
    assert isinstance(session, Session) and session.batched and "batch=2" in repr(session)
