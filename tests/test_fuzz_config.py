"""The config reader against the graph builder: random value-model configs (head counts, GQA, head_dim, rope types
and their parameters, sliding windows, bias flags, tied embeddings, odd sizes) each either export to ONNX with values
that match transformers on the same weights, or are refused with a VexportError naming the feature. Nothing else:
no other exception, no export that runs but differs.

Few examples (each builds, exports and runs a tiny model): the module stays within about 15 s on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vexport.export.onnx  # noqa: F401  imported up front, so the first example measures no import
from vexport.errors import VexportError

CONFIG_FUZZ = settings(max_examples=10, deadline=None, database=None, derandomize=True,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MAX_POSITIONS = 64
VOCAB = 40

# rope parameters per type (rope_theta is added); the expected refusal, or None where the export is exact
ROPES = {
    "default": ({}, None),
    "linear": ({"factor": 2.5}, None),
    "llama3": ({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}, None),
    "yarn": ({"factor": 4.0, "original_max_position_embeddings": 16}, None),
    "proportional": ({"partial_rotary_factor": 0.5}, None),
    "dynamic": ({"factor": 2.0}, "rope_type 'dynamic'"),
    "longrope": ({"short_factor": None, "long_factor": None, "original_max_position_embeddings": 16},
                 "rope_type 'longrope'"),
    "partial linear": ({"factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    "warp": ({}, "rope_type 'warp'"),  # no such rope type
}


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0]))
    head_dim = draw(st.sampled_from([4, 8, 12, 16]))
    hidden = heads * draw(st.sampled_from([4, 6, 8])) if draw(st.booleans()) else heads * head_dim
    rope = draw(st.sampled_from(sorted(ROPES)))
    mistral = draw(st.booleans())
    return {
        "kind": "mistral" if mistral else "llama", "rope": rope,
        "window": draw(st.sampled_from([None, 3, 8, 1000])) if mistral else None,
        "heads": heads, "kv": kv, "head_dim": head_dim, "hidden": hidden,
        "inter": draw(st.sampled_from([8, 20, 40])), "layers": draw(st.sampled_from([1, 2])),
        "attention_bias": draw(st.booleans()), "mlp_bias": draw(st.booleans()), "tie": draw(st.booleans()),
        "optimize": draw(st.booleans()), "length": draw(st.integers(1, 24)), "pad": draw(st.integers(0, 10)),
    }


def _rope_parameters(spec: dict) -> dict:
    kind = spec["rope"].split()[-1] if spec["rope"] != "warp" else "default"
    params = dict(ROPES[spec["rope"]][0])
    if kind == "longrope":
        half = spec["head_dim"] // 2
        params.update(short_factor=[1.0] * half, long_factor=[1.0 + i / half for i in range(half)])
    return {"rope_type": kind, "rope_theta": 10000.0, **params}


def _write_model(folder: Path, spec: dict):
    """The config and seeded weights of SPEC saved with transformers; returns the model (eval mode)."""
    from transformers import LlamaConfig, LlamaForTokenClassification, MistralConfig, MistralForTokenClassification

    from vexport.tiny import init_value_weights

    common = dict(vocab_size=VOCAB, hidden_size=spec["hidden"], intermediate_size=spec["inter"],
                  num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv"],
                  head_dim=spec["head_dim"], max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5,
                  attention_bias=spec["attention_bias"], mlp_bias=spec["mlp_bias"], tie_word_embeddings=spec["tie"],
                  rope_parameters=_rope_parameters(spec), num_labels=1, pad_token_id=0)
    if spec["kind"] == "mistral":
        common.pop("mlp_bias")  # Mistral has no MLP bias
        config, cls = MistralConfig(**common, sliding_window=spec["window"]), MistralForTokenClassification
    else:
        config, cls = LlamaConfig(**common), LlamaForTokenClassification
    config.architectures = [cls.__name__]
    model = cls(config)
    init_value_weights(model, seed=0)
    model.save_pretrained(folder)
    if spec["rope"] == "warp":  # a rope type transformers does not know: only config.json can carry it
        path = folder / "config.json"
        config_json = json.loads(path.read_text())
        config_json["rope_parameters"]["rope_type"] = "warp"
        path.write_text(json.dumps(config_json))
    return model.eval()


def _inputs(spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    length = spec["length"]
    ids = torch.arange(2 * length).reshape(2, length) % (VOCAB - 1) + 1
    mask = torch.ones_like(ids)
    mask[1, : min(spec["pad"], length - 1)] = 0  # left padding, at least one real token
    return ids, mask


@CONFIG_FUZZ
@given(spec=configs())
def test_config_exports_exactly_or_is_refused_by_name(tmp_path_factory, spec):
    import vexport
    from vexport.export.onnx import export_onnx

    base = tmp_path_factory.mktemp("config-fuzz")
    model = _write_model(base / "model", spec)
    refusal = ROPES[spec["rope"]][1]
    try:
        artifact = export_onnx(base / "model", base / "onnx", optimize=spec["optimize"])
    except VexportError as exc:
        assert refusal is not None and refusal in str(exc), (spec, str(exc))
        assert "\n" not in str(exc) and not (base / "onnx").exists()
        return
    assert refusal is None, f"{spec} exported, but it should be refused ({refusal})"
    ids, mask = _inputs(spec)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    got = vexport.load(artifact).values(ids, mask)
    np.testing.assert_allclose(got.numpy(), (want[..., 0] * mask).numpy(), atol=1e-4, rtol=1e-4, err_msg=str(spec))


def test_every_rope_type_is_known_to_the_fuzzer():
    """The table above covers every rope type transformers knows, so a new one is a decision, not a gap."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert set(ROPE_INIT_FUNCTIONS) | {"default"} <= {name.split()[-1] for name in ROPES}
