"""A SentencePiece BPE tokenizer trained locally, shaped like Llama 2's / Mistral's: byte fallback, identity
normalization, a dummy '▁' prefix, <unk>/<s>/</s> at ids 0/1/2. Saved as tokenizer.model and/or as the
tokenizer.json transformers converts it to (merges generated from the vocabulary by transformers itself).

Needs the test extras (sentencepiece, transformers).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

UNK, BOS, EOS = "<unk>", "<s>", "</s>"


def train_spm(texts: Iterable[str], vocab_size: int) -> bytes:
    """The serialized ModelProto of a SentencePiece BPE model trained on the texts' non-empty lines."""
    import sentencepiece as spm

    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        max_sentence_length=1 << 20, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return model.getvalue()


def tokenizer_json_from_spm(model_proto: bytes):
    """The `tokenizers` Tokenizer transformers' LlamaConverter builds (non-legacy): BPE with byte fallback,
    merges for every vocabulary pair ordered by the merged piece's score, Metaspace prepending '▁'."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.tokenization_utils_base import generate_merges

    processor = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = {processor.IdToPiece(i): i for i in range(processor.GetPieceSize())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=UNK, fuse_unk=True,
                                     byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (UNK, BOS, EOS)])
    return tokenizer


def save_spm_tokenizer(model_proto: bytes, folder: Path, model_max_length: int, *, tokenizer_model: bool = True,
                       tokenizer_json: bool = True) -> None:
    """tokenizer.model and/or tokenizer.json, with tokenizer_config.json as a Llama 2 repository has it."""
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_model:
        (folder / "tokenizer.model").write_bytes(model_proto)
    if tokenizer_json:
        tokenizer_json_from_spm(model_proto).save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
