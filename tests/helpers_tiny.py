"""Tiny offline models and tokenizers for the tests (nothing comes from the hub).

Every tiny Llama of the tests is built by :func:`random_llama`; :func:`tiny_llama` (the word
tokenizer's special tokens) and :func:`press_test_llama` (the press API's model) are the two shared
by several files. The per-family models of ``tests/families.py`` are built there.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mixkv.eval.haystack import stdlib_sentences

_SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]

_WORDS = (
    "The grass is green . The sky is blue . The sun is yellow . Here we go . There and back again . "
    "Some special magic number numbers uuid uuids are hidden within the following text "
    "Make sure to memorize it "
    "I will quiz you about the afterwards One of for : What mentioned in provided ? all Answer "
    "VAR = Find variables that assigned value above Memorize track chain assignments According "
    "Below numbered list words these some appear more often than others ones most common top "
    "Read coded frequency each word three frequently appeared Do not any explanation Please ignore "
    "dots ' , documents Document town province founded by river flows through main export Today has "
    "population Only give me answer do output other Question In which year was Who founded"
)


def _word_vocab() -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for tok in [*list("0123456789"), *_WORDS.split()]:
        vocab.setdefault(tok, len(vocab))
    return vocab


def word_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (digits split one by one); unknown words map to ``[UNK]``."""
    tok = Tokenizer(models.WordLevel(vocab=_word_vocab(), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


@functools.lru_cache(maxsize=1)
def _bpe_tokenizer_object() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(stdlib_sentences())[:600], trainer=trainer)
    return tok


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained on docstring sentences (GPT-2 style subwords)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe_tokenizer_object().to_str()),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def random_llama(
    vocab_size: int,
    *,
    layers: int,
    kv_heads: int = 2,
    heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    **config: Any,
) -> LlamaForCausalLM:
    """A randomly initialised Llama of width 64 (query heads of 16 dims, MLP 128), in eval mode.

    Parameters
    ----------
    vocab_size : int
        Token ids.
    layers, kv_heads, heads : int
        Decoder layers, KV heads and query heads per layer (4 query heads by default).
    seed : int
        Seed of the initialisation.
    attn_implementation : str
        ``"sdpa"`` or ``"eager"``.
    **config
        Further :class:`~transformers.LlamaConfig` fields (special tokens, positions,
        ``initializer_range``); unnamed ones keep LlamaConfig's defaults.

    Returns
    -------
    LlamaForCausalLM
        The model.
    """
    torch.manual_seed(seed)
    llama_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        **config,
    )
    return LlamaForCausalLM._from_config(llama_config, attn_implementation=attn_implementation).eval()


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """A :func:`random_llama` with the word tokenizer's special tokens and 4096 positions."""
    return random_llama(
        vocab_size,
        layers=layers,
        seed=seed,
        max_position_embeddings=4096,
        bos_token_id=_SPECIALS.index("[BOS]"),
        eos_token_id=_SPECIALS.index("[EOS]"),
        pad_token_id=_SPECIALS.index("[PAD]"),
    )


def press_test_llama(**overrides: Any) -> LlamaForCausalLM:
    """The press API tests' model: a 3-layer :func:`random_llama` over 128 ids, pad id 0, no BOS/EOS,
    weights drawn 10x wider than the default (``initializer_range`` 0.2); ``overrides`` (e.g.
    ``kv_heads=4, heads=8``) go to :func:`random_llama`."""
    settings: dict[str, Any] = {
        "layers": 3,
        "max_position_embeddings": 512,
        "initializer_range": 0.2,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": 0,
    }
    return random_llama(128, **{**settings, **overrides})


def scale_weight_matrices(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    """Multiply ``model``'s weight matrices by ``factor`` in place and return it.

    A default tiny model's answers barely depend on its cache (mostly one word repeated); sharper
    logits make them show a wrong row, position or kept entry.
    """
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(factor)
    return model


def tiny_model_and_tokenizer(seed: int = 0) -> tuple[Any, PreTrainedTokenizerFast]:
    """The tiny Llama with the word-level tokenizer."""
    tok = word_tokenizer()
    return tiny_llama(len(tok), seed), tok


#: A small text grid for :func:`mixkv.eval.runner.run_eval` (add ``methods``): budget 40, window 8,
#: two ``niah_single_1`` examples of 128 tokens, 4 new tokens.
SMALL_GRID: dict[str, Any] = {
    "budgets": [40],
    "tasks": ["niah_single_1"],
    "context_lengths": [128],
    "n": 2,
    "max_new_tokens": 4,
    "window_size": 8,
}


def grid_run_twice(
    model_and_tokenizer: tuple[Any, Any], out_dir: Any, methods: list[str], **second: Any
) -> list[tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]]:
    """:data:`SMALL_GRID` of ``methods`` run with the defaults and again with the options
    ``second``: per cell of the first run, the cell and its examples in the first and in the
    second run."""
    from mixkv.eval.runner import run_eval

    grid = {**SMALL_GRID, "methods": methods}
    first = run_eval(model_and_tokenizer, out_dir=out_dir / "first", **grid)
    other = run_eval(model_and_tokenizer, out_dir=out_dir / "second", **grid, **second)
    by_cell = {str(data["cell"]): data["examples"] for data in other.cells}
    return [(data["cell"], data["examples"], by_cell[str(data["cell"])]) for data in first.cells]
