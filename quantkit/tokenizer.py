"""A model folder's tokenizer (tokenizer.json, through the `tokenizers` library) and the special tokens it adds
around a text, shared by the GGUF metadata, calibration and evaluation so that all of them agree with what
llama.cpp's tools do with the converted file."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import ConfigError

log = logging.getLogger(__name__)


def load_tokenizer(folder: Path, purpose: str):
    from tokenizers import Tokenizer

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"{folder}: no tokenizer.json to {purpose}")
    return Tokenizer.from_file(str(file))


@dataclass(frozen=True)
class SpecialTokens:
    """Whether BOS / EOS are added to every text (None: the files do not say), and the tokens' texts."""

    add_bos: bool | None = None
    add_eos: bool | None = None
    bos: str | None = None
    eos: str | None = None
    eot: str | None = None  # the configured EOS, when the post-processor appends another token as EOS


def _content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(file: Path) -> dict:
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def _processors(node: dict | None) -> list[dict]:
    """The leaves of a tokenizer.json post-processor, Sequences flattened."""
    if not node:
        return []
    children = node.get("processors")
    return [leaf for child in children for leaf in _processors(child)] if children is not None else [node]


def special_tokens(folder: Path) -> SpecialTokens:
    """Read as gguf-py's SpecialVocab reads them (gguf 0.19 vocab.py, _try_load_from_tokenizer_json):
    tokenizer_config.json's add_bos_token / add_eos_token when set, else tokenizer.json's post-processor, the only
    place transformers >= 5 saves them. A TemplateProcessing's leading special token means add BOS if it is the
    BOS (or CLS; without a tokenizer_config.json it is taken as the BOS); a trailing one means add EOS and becomes
    the EOS, the configured one being kept as EOT."""
    tok = _read_json(folder / "tokenizer.json")
    config = _read_json(folder / "tokenizer_config.json")
    bos, eos = _content(config.get("bos_token")), _content(config.get("eos_token"))
    cls, sep = _content(config.get("cls_token")), _content(config.get("sep_token"))
    if config:  # SpecialVocab's stand-ins: an encoder's CLS/SEP play BOS/EOS
        bos, eos = bos or cls, eos or sep
    add: dict[str, bool] = {}
    eot = None
    for processor in _processors(tok.get("post_processor")):
        kind = processor.get("type")
        if kind == "RobertaProcessing":
            add.update(bos=True, eos=True)
        elif kind == "TemplateProcessing" and len(single := processor.get("single", [])) > 1:
            first = single[0].get("SpecialToken", {}).get("id")
            if first:
                if not config:
                    bos = first
                add["bos"] = first in (bos, cls)
                if not add["bos"]:
                    log.warning("tokenizer.json: unknown leading special token %r in the post-processor; BOS is "
                                "not added", first)
            last = single[-1].get("SpecialToken", {}).get("id")
            if last:
                if config and last != eos:
                    eot = eos
                eos, add["eos"] = last, True
    for kind in ("bos", "eos"):
        if isinstance(config.get(f"add_{kind}_token"), bool):
            add[kind] = config[f"add_{kind}_token"]
    return SpecialTokens(add.get("bos"), add.get("eos"), bos, eos, eot)


def added_bos(folder: Path, config: dict) -> int | None:
    """The BOS llama-imatrix and llama-perplexity put at every chunk start when the tokenizer adds one (the
    same rule as the GGUF's tokenizer.ggml.add_bos_token), else None."""
    specials = special_tokens(folder)
    if not specials.add_bos:
        return None
    tok = _read_json(folder / "tokenizer.json")
    ids = {**tok.get("model", {}).get("vocab", {}), **{a["content"]: a["id"] for a in tok.get("added_tokens", [])}}
    token_id = ids.get(specials.bos)
    return token_id if isinstance(token_id, int) else config.get("bos_token_id")
