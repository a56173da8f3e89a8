"""tokenizer.* metadata for SentencePiece models: read from tokenizer.model without sentencepiece, or derived
from the byte-fallback BPE tokenizer.json transformers makes of it; which file wins; bad files."""

import io
import json
import logging

import pytest

from quantkit.errors import ConfigError
from quantkit.formats.gguf import sentencepiece_model as spm_model
from quantkit.formats.gguf.tokenizer import tokenizer_metadata
from quantkit.testing.spm_tokenizer import save_spm_tokenizer, train_spm
from quantkit.testing.tokenizer import save_tokenizer, train_bpe

sentencepiece = pytest.importorskip("sentencepiece", reason="the test extras provide sentencepiece")

TEXTS = ["def add(a, b):\n    return a + b\n" * 40, "class Point:\n    x: int = 0\n    y: int = 0\n" * 40,
         "Grüße, naïve café. 中文 text; numbers 12345 and 67890.\n" * 40]
VOCAB = 400
CONFIG = {"bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture(scope="module")
def proto():
    return train_spm(TEXTS, VOCAB)


@pytest.fixture
def spm_folder(proto, tmp_path):
    def make(name="tok", **files):
        folder = tmp_path / name
        save_spm_tokenizer(proto, folder, 512, **files)
        return folder

    return make


def _values(meta):
    return {k: v.value for k, v in meta.items()}


def test_reader_agrees_with_sentencepiece(proto, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(proto)
    model = spm_model.read_sentencepiece_model(path)
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    assert len(model.pieces) == processor.GetPieceSize() == VOCAB
    for i, piece in enumerate(model.pieces):
        assert piece.text == processor.IdToPiece(i) and piece.score == processor.GetScore(i)
    kinds = {i: p.type for i, p in enumerate(model.pieces)}
    assert [i for i, t in kinds.items() if t == spm_model.BYTE] == [i for i in range(VOCAB) if processor.IsByte(i)]
    assert kinds[0] == spm_model.UNKNOWN and kinds[1] == kinds[2] == spm_model.CONTROL
    assert (model.model_type, model.byte_fallback, model.normalizer_name) == ("bpe", True, "identity")
    assert model.add_dummy_prefix and not model.remove_extra_whitespaces


def test_tokenizer_model_gives_llama_vocabulary(spm_folder, proto):
    meta = _values(tokenizer_metadata(spm_folder(tokenizer_json=False), VOCAB + 8, CONFIG))
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    tokens, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == VOCAB + 8  # padded to the config's vocabulary
    assert tokens[:VOCAB] == [processor.IdToPiece(i) for i in range(VOCAB)]
    assert scores[:VOCAB] == [processor.GetScore(i) for i in range(VOCAB)]
    assert tokens[VOCAB:] == [f"[PAD{i}]" for i in range(VOCAB, VOCAB + 8)] and set(types[VOCAB:]) == {5}
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)] and set(types[3:259]) == {spm_model.BYTE}
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.unknown_token_id"] == 0 and meta["tokenizer.ggml.add_bos_token"] is True
    assert "tokenizer.ggml.merges" not in meta


def test_tokenizer_json_gives_the_same_vocabulary_and_merge_order(spm_folder):
    from_model = _values(tokenizer_metadata(spm_folder("model", tokenizer_json=False), VOCAB, CONFIG))
    from_json = _values(tokenizer_metadata(spm_folder("json", tokenizer_model=False), VOCAB, CONFIG))
    for key in ("model", "pre", "tokens", "token_type", "add_space_prefix", "bos_token_id", "unknown_token_id"):
        assert from_json[f"tokenizer.ggml.{key}"] == from_model[f"tokenizer.ggml.{key}"], key
    # llama.cpp only compares scores of merge results: both orders must rank those pieces alike
    types, tokens = from_model["tokenizer.ggml.token_type"], from_model["tokenizer.ggml.tokens"]
    merged = [i for i in range(VOCAB) if types[i] == spm_model.NORMAL and len(tokens[i]) > 1]
    for scores in (from_model["tokenizer.ggml.scores"], from_json["tokenizer.ggml.scores"]):
        ranked = sorted(merged, key=lambda i: -scores[i])
        assert ranked == merged  # SentencePiece stores merge results best first


def test_byte_level_tokenizer_json_wins_over_a_stray_tokenizer_model(proto, tmp_path):
    folder = tmp_path / "tok"
    save_tokenizer(train_bpe(TEXTS, 300), folder, 512)
    (folder / "tokenizer.model").write_bytes(proto)
    meta = _values(tokenizer_metadata(folder, 300, {}))
    assert meta["tokenizer.ggml.model"] == "gpt2" and "tokenizer.ggml.scores" not in meta


def test_added_tokens_are_typed(spm_folder):
    folder = spm_folder()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"400": {"content": "<|im_start|>", "special": True},
                                      "401": {"content": "\u2581tool", "special": False}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    meta = _values(tokenizer_metadata(folder, 402, CONFIG))
    assert meta["tokenizer.ggml.tokens"][400:] == ["<|im_start|>", " tool"]
    assert meta["tokenizer.ggml.token_type"][400:] == [spm_model.CONTROL, spm_model.USER_DEFINED]
    assert meta["tokenizer.ggml.token_type"][0] == spm_model.UNKNOWN  # stays the model's type


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_tokenizer_model_is_named(spm_folder, damage):
    folder = spm_folder(tokenizer_json=False)
    path = folder / "tokenizer.model"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage])
    with pytest.raises(ConfigError, match="tokenizer.model"):
        tokenizer_metadata(folder, VOCAB, CONFIG)


def test_normalizing_or_unigram_models_warn(tmp_path, caplog):
    model_file = tmp_path / "tokenizer.model"
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=buffer, vocab_size=100,
                                             hard_vocab_limit=False,
                                             model_type="unigram", minloglevel=2)
    model_file.write_bytes(buffer.getvalue())
    with caplog.at_level(logging.WARNING):
        meta = _values(tokenizer_metadata(tmp_path, 0, {}))
    assert meta["tokenizer.ggml.model"] == "llama"
    assert "unigram" in caplog.text and "normalizes" in caplog.text


def test_byte_fallback_json_without_byte_tokens_is_refused(spm_folder):
    folder = spm_folder(tokenizer_model=False)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {t: i for t, i in tok["model"]["vocab"].items() if not t.startswith("<0x")}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match="byte tokens"):
        tokenizer_metadata(folder, VOCAB, CONFIG)
