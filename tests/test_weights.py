"""Tests of the GGUF conversion's tokenizer: the GGUF's control tokens stay whole whichever
transformers version converted it (5.2 kept only three of Qwen2.5's, splitting ``<|image_pad|>``)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mixkv import weights
from mixkv.weights import register_added_tokens

VOCAB = {
    "<|": 0,
    "image_pad": 1,
    "|>": 2,
    "<|image_pad|>": 3,
    "hi": 4,
    "<tool>": 5,
    "<": 6,
    "tool": 7,
    ">": 8,
    "?": 9,
}


def _tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="?")


def test_a_control_token_is_split_until_registered_then_kept_whole_with_its_vocabulary_id():
    tokenizer = _tokenizer()
    assert tokenizer.encode("<|image_pad|> hi", add_special_tokens=False) == [0, 1, 2, 4]
    added = register_added_tokens(tokenizer, [("<|image_pad|>", True), ("<tool>", False)])
    assert added == ["<|image_pad|>", "<tool>"]
    assert tokenizer.encode("<|image_pad|> hi <tool>", add_special_tokens=False) == [3, 4, 5]
    assert len(tokenizer) == len(VOCAB)  # no new id
    kinds = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    assert kinds == {"?": True, "<|image_pad|>": True, "<tool>": False}  # "?": the unknown token


def test_registering_again_or_a_token_outside_the_vocabulary_adds_nothing():
    tokenizer = _tokenizer()
    register_added_tokens(tokenizer, [("<|image_pad|>", True)])
    assert register_added_tokens(tokenizer, [("<|image_pad|>", True), ("<|absent|>", True)]) == []
    assert len(tokenizer) == len(VOCAB)


def test_the_gguf_control_and_user_defined_tokens_are_read_with_their_kind(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(["hi", "<|im_end|>", "<tool>", "[UNUSED]"])
    writer.add_token_types([1, 3, 4, 5])  # normal, control, user-defined, unused
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert weights._gguf_added_tokens(path) == [("<|im_end|>", True), ("<tool>", False)]


@pytest.mark.parametrize("marker", [None, {"source": "x.gguf"}, {"format": 1}])
def test_a_conversion_without_this_format_in_its_marker_is_converted_again(tmp_path, marker):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    if marker is not None:
        (tmp_path / weights._MARKER).write_text(json.dumps(marker))
    assert not weights._is_converted(tmp_path)
    (tmp_path / weights._MARKER).write_text(json.dumps({"format": weights._CONVERSION_FORMAT}))
    assert weights._is_converted(tmp_path)
