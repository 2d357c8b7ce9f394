"""Tiny offline models and tokenizers for the evaluation tests (nothing comes from the hub)."""

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


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2) -> Any:
    """A randomly initialised 2-layer Llama (4 query heads, 2 KV heads, head_dim 16), eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    model.eval()
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
