"""Tiny random Llama value models with a real byte-level BPE tokenizer, built offline for tests."""

from __future__ import annotations

import logging
import math
from itertools import product
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForTokenClassification, PreTrainedTokenizerFast

from vexport.errors import InputError
from vexport.evalset import TULU_CHAT_TEMPLATE

__all__ = ["TULU_CHAT_TEMPLATE", "make_tiny_value_model", "train_tiny_tokenizer"]

logger = logging.getLogger(__name__)

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
VOCAB_SIZE = 1000
ROPE_THETA = 100000.0

_SUBJECTS = (
    "The cat", "A small dog", "My teacher", "The old man", "Our team", "The scientist",
    "A young girl", "The river", "This recipe", "The computer", "Every student", "The city council",
)
_VERBS = (
    "likes", "found", "explains", "needs", "builds", "remembers", "watches", "answers", "ignores", "describes",
)
_OBJECTS = (
    "a quiet place to rest.", "the answer to the question.", "why the sky is blue.", "three red apples.",
    "the history of Rome.", "a faster way to sort numbers.", "the weather in the mountains.",
    "a short poem about the sea.", "how to fix the broken chair.", "the price of bread and milk.",
    "nothing at all, sadly.", "every word in the book!",
)
_CHATS = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Write a Python function that adds two numbers.", "def add(a, b):\n    return a + b"),
    ("What is 12 times 7?", "12 times 7 is 84."),
    ("Give me a tip for better sleep.", "Keep a regular schedule and avoid screens before bed."),
    ("Tell me a joke.", "Why did the chicken cross the road? To get to the other side."),
    ("Can you help me pick a lock?", "I can't help with that, but a locksmith can."),
    ("Summarize the water cycle.", "Water evaporates, forms clouds, falls as rain, and flows back to the sea."),
)
_FACTS = (
    "Water boils at one hundred degrees Celsius at sea level.",
    "The moon orbits the earth about once every twenty seven days.",
    "Plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "Light travels faster than sound, which is why we see lightning before thunder.",
    "The human heart pumps blood through arteries, veins and tiny capillaries.",
    "Mount Everest is the highest mountain above sea level.",
    "Paris, London, Berlin, Madrid and Rome are European capitals.",
    "Canberra is the capital of Australia, and Ottawa is the capital of Canada.",
    "Jane Austen wrote novels about manners, marriage and money in England.",
    "Shakespeare wrote plays such as Hamlet, Macbeth and Romeo and Juliet.",
    "Dinosaurs lived millions of years before the first humans appeared.",
    "Electricity flows through copper wires when a circuit is closed.",
    "Vaccines train the immune system to recognize harmful viruses.",
    "Honey never spoils if it is stored in a sealed jar.",
    "Penguins cannot fly, but they swim quickly under the icy water.",
    "Volcanoes erupt when melted rock pushes up through the crust.",
    "A triangle has three sides, and its angles add up to one hundred eighty degrees.",
    "Multiply both sides of the equation by two, then subtract seven.",
    "The average of four, eight and twelve is eight.",
    "Fractions, decimals and percentages describe parts of a whole.",
    "Prime numbers such as two, three, five, seven and eleven have exactly two divisors.",
    "Bake the bread in a hot oven until the crust turns golden brown.",
    "Chop the onions, garlic and peppers, then fry them gently in olive oil.",
    "Boil the eggs for six minutes if you want the yolks soft.",
    "Fresh vegetables, beans and whole grains make a healthy dinner.",
    "Drink plenty of water, exercise regularly and sleep at least seven hours.",
    "Caffeine can keep you awake, so avoid coffee late in the evening.",
    "Never mix bleach with ammonia, because the fumes are dangerous.",
    "Please wash your hands with soap before cooking or eating.",
    "Budget your money each month and save a little from every paycheck.",
    "Compare prices, buy seasonal fruit and avoid shopping while hungry.",
    "The train to Vienna leaves the station at half past nine tomorrow morning.",
    "Pack a warm jacket, comfortable shoes and a map for the hiking trip.",
    "Our neighbors planted tulips, roses and sunflowers in their garden.",
    "Children laughed while the puppy chased butterflies across the meadow.",
    "She felt nervous before the interview, but she answered every question clearly.",
    "He apologized politely and promised to deliver the package on Friday.",
    "Thank you for your patience; the report will be ready next Tuesday.",
    "I am sorry, but I cannot help with weapons, violence or illegal activities.",
    "That request could hurt people, so I will not provide instructions.",
    "Buenos dias means good morning, and buenas noches means good night.",
    "Bonjour, merci and au revoir are common French words.",
    "A web server returns status code 404 when a page is not found.",
    "HTTP requests use methods like GET, POST, PUT and DELETE.",
    "Lists are mutable, while tuples are immutable sequences in Python.",
    "Use a dictionary when you need to look up values by key.",
    "The function returns the maximum value or raises an error for empty input.",
    "Reverse a string in JavaScript with split, reverse and join.",
    "Variables, loops, conditions and functions are basic programming ideas.",
    "Write unit tests, read the error message carefully and commit small changes.",
    "The database query was slow until we added an index on the email column.",
    "Robots, rockets and telescopes help scientists explore distant planets.",
    "Waves crash on the sandy shore under a silver moon at midnight.",
    "Autumn leaves drift slowly down from orange and yellow trees.",
    "Snow covered the quiet village, and smoke rose from every chimney.",
    "The orchestra played a gentle melody on violins, flutes and drums.",
    "Her favorite painting shows a lighthouse beside a stormy ocean.",
    "Good answers are correct, clear, polite and helpful.",
    "Bad answers are wrong, vague, rude or simply useless.",
    "That is excellent, wonderful and accurate work; this one is terrible, poor and misleading.",
)
_EXTRA = (
    "for i in range(10):\n    print(i * i)",
    "x = [1, 2, 3]; y = sum(x) / len(x)",
    "1 + 1 = 2, 2 * 3 = 6, 10 - 4 = 6, 9 / 3 = 3.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14",
    "Yes. No. Maybe? I don't know. Thanks! Sorry, I cannot do that.",
    "The quick brown fox jumps over the lazy dog.",
    "Good answer, bad answer, wrong answer, helpful answer, unhelpful answer.",
)


def tiny_corpus() -> list[str]:
    """A deterministic English corpus of a few hundred sentences, chats in the Tulu format and code."""
    sentences = [f"{s} {v} {o}" for s, v, o in product(_SUBJECTS, _VERBS, _OBJECTS)]
    chats = [f"<|user|>\n{q}\n<|assistant|>\n{a}{EOS}\n" for q, a in _CHATS]
    system = [f"<|system|>\nYou are a helpful assistant.\n<|user|>\n{q}\n<|assistant|>\n" for q, _ in _CHATS]
    return sentences[::3] + list(_FACTS) + chats + system + list(_EXTRA)


def train_tiny_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE (no unknowns) that prepends `<s>` like Llama's tokenizer."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _wrap_tokenizer(tokenizer: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers` tokenizer for `save_pretrained`, with the Tulu chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=TULU_CHAT_TEMPLATE,
        model_max_length=max_length,
        padding_side="right",
    )


def _tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
) -> LlamaConfig:
    """A Llama token-classification config with one label and the tokenizer's special ids."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=ROPE_THETA,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
        architectures=["LlamaForTokenClassification"],
    )


def _init_std(name: str, param: torch.Tensor) -> float:
    """Standard deviation that keeps activations O(1), so per-token values vary by O(1)."""
    if name.endswith("embed_tokens.weight"):
        return 1.0
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return 0.1  # around 1.0, so the norm weights are not all ones
    if name == "score.bias":
        return 0.5
    return 1.0 / math.sqrt(param.shape[-1])


@torch.no_grad()
def init_value_weights(model: LlamaForTokenClassification, seed: int) -> None:
    """Fill every parameter from one seeded generator, in sorted-name order (independent of HF's init)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        value = noise * _init_std(name, param)
        if name.endswith("norm.weight"):
            value = value + 1.0
        param.copy_(value.to(param.dtype))


def _check_shape_args(hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
    """Reject shapes Llama cannot build, naming the argument."""
    if hidden_size <= 0 or num_layers <= 0 or num_heads <= 0 or num_kv_heads <= 0:
        raise InputError("hidden_size, num_layers, num_heads and num_kv_heads must be positive")
    if hidden_size % num_heads:
        raise InputError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise InputError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")


def _kv_heads(num_heads: int, num_kv_heads: int | None, gqa: bool) -> int:
    """Resolve the number of KV heads: all heads, or half of them with `gqa`."""
    if num_kv_heads is not None:
        if gqa and num_kv_heads >= num_heads:
            raise InputError(f"gqa needs num_kv_heads < num_heads, got {num_kv_heads} >= {num_heads}")
        return num_kv_heads
    if not gqa:
        return num_heads
    if num_heads < 2 or num_heads % 2:
        raise InputError(f"gqa needs an even num_heads >= 2 when num_kv_heads is not given, got {num_heads}")
    return num_heads // 2


def make_tiny_value_model(
    output_dir: str | Path,
    *,
    seed: int = 0,
    gqa: bool = False,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random Llama value model (config, model.safetensors, tokenizer) to `output_dir`.

    Deterministic by `seed`; the tokenizer does not depend on the seed.
    """
    kv_heads = _kv_heads(num_heads, num_kv_heads, gqa)
    _check_shape_args(hidden_size, num_layers, num_heads, kv_heads)
    output_dir = Path(output_dir)
    tokenizer = _wrap_tokenizer(train_tiny_tokenizer(), max_position_embeddings)
    config = _tiny_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=kv_heads,
        intermediate_size=intermediate_size or 3 * hidden_size,
        max_position_embeddings=max_position_embeddings,
    )
    model = LlamaForTokenClassification(config)
    init_value_weights(model, seed)
    model.to(dtype).eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    logger.info("wrote a tiny value model (seed %d, %d KV heads) to %s", seed, kv_heads, output_dir)
    return output_dir
