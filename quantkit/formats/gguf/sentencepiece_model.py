"""A SentencePiece tokenizer.model read without the sentencepiece/protobuf packages.

The file is a serialized `ModelProto` (sentencepiece_model.proto). Only the fields a GGUF needs are kept:
the pieces (text, score, type) and the trainer/normalizer flags that decide how llama.cpp must split text.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import ConfigError

# SentencePiece piece types (ModelProto.SentencePiece.Type), the same numbers llama.cpp's token types use
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


@dataclass
class Piece:
    text: str
    score: float = 0.0
    type: int = NORMAL


@dataclass
class SentencePieceModel:
    pieces: list[Piece] = field(default_factory=list)
    model_type: str = "unigram"  # proto defaults, used when the file leaves a field out
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


class _Malformed(Exception):
    pass


def _fields(buf: bytes):
    """(field number, wire type, value) of one message; bytes values are returned raw."""
    pos, end = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise _Malformed("truncated varint")
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    while pos < end:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value = varint()
        elif wire == _FIXED32 or wire == _FIXED64:
            size = 4 if wire == _FIXED32 else 8
            if pos + size > end:
                raise _Malformed("truncated fixed-width field")
            value, pos = buf[pos:pos + size], pos + size
        elif wire == _BYTES:
            size = varint()
            if pos + size > end:
                raise _Malformed(f"field {number} runs past the end")
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise _Malformed(f"unsupported wire type {wire}")
        yield number, wire, value


def _piece(buf: bytes) -> Piece:
    piece = Piece("")
    for number, wire, value in _fields(buf):
        if number == 1 and wire == _BYTES:
            piece.text = value.decode("utf-8")
        elif number == 2 and wire == _FIXED32:
            piece.score = struct.unpack("<f", value)[0]
        elif number == 3 and wire == _VARINT:
            piece.type = value
    return piece


def read_sentencepiece_model(path: Path) -> SentencePieceModel:
    try:
        model = SentencePieceModel()
        for number, wire, value in _fields(path.read_bytes()):
            if number == 1 and wire == _BYTES:
                model.pieces.append(_piece(value))
            elif number == 2 and wire == _BYTES:  # TrainerSpec
                for sub, sub_wire, sub_value in _fields(value):
                    if sub_wire != _VARINT:
                        continue
                    if sub == 3:
                        model.model_type = MODEL_TYPES.get(sub_value, f"type {sub_value}")
                    elif sub == 24:
                        model.treat_whitespace_as_suffix = bool(sub_value)
                    elif sub == 35:
                        model.byte_fallback = bool(sub_value)
            elif number == 3 and wire == _BYTES:  # NormalizerSpec
                for sub, sub_wire, sub_value in _fields(value):
                    if sub == 1 and sub_wire == _BYTES:
                        model.normalizer_name = sub_value.decode("utf-8")
                    elif sub == 3 and sub_wire == _VARINT:
                        model.add_dummy_prefix = bool(sub_value)
                    elif sub == 4 and sub_wire == _VARINT:
                        model.remove_extra_whitespaces = bool(sub_value)
    except (_Malformed, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable SentencePiece model ({e}); re-download tokenizer.model") from e
    if not model.pieces:
        raise ConfigError(f"{path}: a SentencePiece model with no pieces; re-download tokenizer.model")
    return model
