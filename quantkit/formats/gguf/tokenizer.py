"""The tokenizer.* metadata of a GGUF file, from a HF folder's tokenizer files.

Byte-level BPE (llama.cpp "gpt2", tokenizer.json): tokens, token types, merges and the pre-tokenizer name.
llama.cpp picks its pre-tokenizer by name, so the name is chosen from the pre-tokenizer's split regexes
(convert identifies known tokenizers by hashing their output on a fixed text, which cannot recognise a
tokenizer trained locally with a known regex); `pre` overrides the choice.
SentencePiece BPE (llama.cpp "llama"): tokens, scores and piece types (BYTE, UNKNOWN, CONTROL...) from
tokenizer.model, or derived from a byte-fallback BPE tokenizer.json; add_space_prefix.
Both: special ids, add_bos/add_eos and the chat template, as convert_hf_to_gguf.py and gguf-py's SpecialVocab
write them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from gguf.constants import GGUFValueType

from quantkit.errors import ConfigError
from quantkit.formats.gguf.file import Value, array, boolean, string, u32
from quantkit.formats.gguf.sentencepiece_model import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    SentencePieceModel,
    read_sentencepiece_model,
)
from quantkit.tokenizer import special_tokens

log = logging.getLogger(__name__)

SPIECE_UNDERLINE = "\u2581"
ADDED_TOKEN_SCORE = -1000.0  # what convert_hf_to_gguf.py gives added and padding tokens
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = _QWEN2_REGEX.replace(r"\p{N}|", r"\p{N}{1,3}|")
_DEEPSEEK_V3_MARKERS = (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+")

# llama.cpp pre-tokenizer names this module can recognise, and the regexes that identify them
KNOWN_PRE = {"qwen2": "Qwen2 / R1-Distill-Qwen", "llama-bpe": "Llama 3 / R1-Distill-Llama",
             "deepseek-v3": "DeepSeek-V3 / R1"}


def _split_patterns(pre_tokenizer: dict | None) -> list[str]:
    splits = [p.get("pattern", {}) for p in _flatten(pre_tokenizer, "pretokenizers") if p.get("type") == "Split"]
    return [pattern.get("Regex") or pattern.get("String") or "" for pattern in splits]


def detect_pre(tokenizer_json: dict) -> str | None:
    patterns = _split_patterns(tokenizer_json.get("pre_tokenizer"))
    if patterns == [_QWEN2_REGEX]:
        return "qwen2"
    if patterns == [_LLAMA3_REGEX]:
        return "llama-bpe"
    if all(any(m == p for p in patterns) for m in _DEEPSEEK_V3_MARKERS):
        return "deepseek-v3"
    return None


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(file: Path) -> dict:
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def _is_byte_level_bpe(model: dict) -> bool:
    return model.get("type") == "BPE" and not model.get("byte_fallback", False)


def tokenizer_metadata(folder: Path, vocab_size: int, config: dict, pre: str | None = None) -> dict[str, Value]:
    """Byte-level BPE from tokenizer.json; otherwise SentencePiece from tokenizer.model, or from a
    byte-fallback BPE tokenizer.json (the form transformers converts SentencePiece models to)."""
    tokenizer_file, spm_file = folder / "tokenizer.json", folder / "tokenizer.model"
    tok = _read_json(tokenizer_file)
    tok_config = _read_json(folder / "tokenizer_config.json")
    model = tok.get("model", {})
    if tok and _is_byte_level_bpe(model):
        vocab = _byte_level_bpe_vocab(tok, tokenizer_file, pre)
    elif spm_file.is_file():
        vocab = _sentencepiece_vocab(read_sentencepiece_model(spm_file), spm_file)
    elif tok and model.get("type") == "BPE":
        vocab = _byte_fallback_bpe_vocab(tok, tokenizer_file)
    elif tok:
        raise ConfigError(f"{tokenizer_file}: tokenizer model {model.get('type')!r} is not supported; quantkit "
                          "writes byte-level BPE (llama.cpp 'gpt2') and SentencePiece BPE (llama.cpp 'llama') "
                          "tokenizers")
    else:
        raise ConfigError(f"{folder}: no tokenizer.json or tokenizer.model; GGUF files carry the tokenizer, so the "
                          "model folder needs its tokenizer files")
    vocab.add_tokens(_added_tokens(folder, tok, tok_config))
    if vocab.space_prefix is not None and tok_config.get("add_prefix_space") is not None:
        vocab.space_prefix = bool(tok_config["add_prefix_space"])  # as convert_hf_to_gguf.py lets it override
    meta = vocab.metadata(vocab_size)
    meta.update(_special_metadata(folder, vocab, tok_config, config))
    return meta


def placeholder_tokenizer_metadata(vocab_size: int, pre: str, config: dict) -> dict[str, Value]:
    """A byte-level BPE ("gpt2") vocabulary of `vocab_size` entries with no real tokens: the 256 byte symbols,
    the config's BOS/EOS as control tokens, every other id a padding token, no merges. For files made to be
    loaded, not run (quantkit.formats.gguf.writer.write_skeleton): llama.cpp checks the vocabulary's size
    against token_embd and needs a tokenizer model and pre-tokenizer it knows (`pre`: a KNOWN_PRE name)."""
    vocab = _Vocab("gpt2", pre)
    for byte, symbol in enumerate(_byte_symbols()):
        vocab.set(byte, symbol, NORMAL)
    meta_ids = {}
    for kind in ("bos", "eos"):
        token_id = config.get(f"{kind}_token_id")
        if isinstance(token_id, int) and 256 <= token_id < vocab_size:
            vocab.set(token_id, f"<|placeholder_{kind}|>", CONTROL)
            meta_ids[f"tokenizer.ggml.{kind}_token_id"] = u32(token_id)
    meta = vocab.metadata(vocab_size)
    meta.update(meta_ids)
    return meta


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable character table (bytes_to_unicode), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


class _Vocab:
    """Token texts, types and (SentencePiece) scores by id, before padding to the model's vocabulary size."""

    def __init__(self, model: str, pre: str, space_prefix: bool | None = None):
        self.model, self.pre, self.space_prefix = model, pre, space_prefix
        self.tokens: dict[int, str] = {}
        self.types: dict[int, int] = {}
        self.scores: dict[int, float] | None = {} if model == "llama" else None
        self.merges: list[str] | None = [] if model == "gpt2" else None

    def set(self, token_id: int, text: str, token_type: int, score: float = 0.0) -> None:
        self.tokens[token_id], self.types[token_id] = text, token_type
        if self.scores is not None:
            self.scores[token_id] = score

    def add_tokens(self, added: dict[int, tuple[str, bool]]) -> None:
        for token_id, (text, special) in sorted(added.items()):
            if self.types.get(token_id) in (UNKNOWN, CONTROL, BYTE, USER_DEFINED) and self.tokens[token_id] == text:
                continue  # the tokenizer model already types it
            if not special and self.model == "llama":
                text = text.replace(SPIECE_UNDERLINE, " ")  # llama.cpp matches user-defined tokens on raw text
            self.set(token_id, text, CONTROL if special else USER_DEFINED, ADDED_TOKEN_SCORE)

    def token_ids(self) -> dict[str, int]:
        return {t: i for i, t in self.tokens.items()}

    def metadata(self, vocab_size: int) -> dict[str, Value]:
        size = max(vocab_size, max(self.tokens) + 1)
        tokens, types, scores = [], [], []
        for i in range(size):
            if i in self.tokens:
                tokens.append(self.tokens[i] or f"[EMPTY_{i}]")
                types.append(self.types[i])
                scores.append(self.scores[i] if self.scores is not None else 0.0)
            else:  # ids the config reserves beyond the tokenizer (DeepSeek-V3 pads its vocabulary)
                tokens.append(f"[PAD{i}]")
                types.append(UNUSED)
                scores.append(ADDED_TOKEN_SCORE)
        meta = {"tokenizer.ggml.model": string(self.model), "tokenizer.ggml.pre": string(self.pre),
                "tokenizer.ggml.tokens": array(GGUFValueType.STRING, tokens)}
        if self.scores is not None:
            meta["tokenizer.ggml.scores"] = array(GGUFValueType.FLOAT32, scores)
        meta["tokenizer.ggml.token_type"] = array(GGUFValueType.INT32, types)
        if self.merges is not None:
            meta["tokenizer.ggml.merges"] = array(GGUFValueType.STRING, self.merges)
        if self.space_prefix is not None:
            meta["tokenizer.ggml.add_space_prefix"] = boolean(self.space_prefix)
        return meta


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges", [])]


def _byte_level_bpe_vocab(tok: dict, tokenizer_file: Path, pre: str | None) -> _Vocab:
    chosen_pre = pre or detect_pre(tok)
    if chosen_pre is None:
        raise ConfigError(f"{tokenizer_file}: its pre-tokenizer is not one quantkit recognises "
                          f"({', '.join(f'{k} = {v}' for k, v in KNOWN_PRE.items())}); llama.cpp needs the right "
                          "name to split text the same way: pass it with --tokenizer-pre NAME")
    vocab = _Vocab("gpt2", chosen_pre)
    for text, token_id in tok["model"]["vocab"].items():
        vocab.set(token_id, text, NORMAL)
    vocab.merges = [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in _merge_pairs(tok["model"])]
    return vocab


def _sentencepiece_vocab(spm: SentencePieceModel, spm_file: Path) -> _Vocab:
    if spm.model_type != "bpe":
        log.warning("%s: a SentencePiece %s model; llama.cpp's SentencePiece tokenizer merges pieces by score "
                    "as SentencePiece BPE does, so its tokens may differ from this model's", spm_file, spm.model_type)
    if spm.remove_extra_whitespaces or spm.normalizer_name not in ("", "identity"):
        log.warning("%s: SentencePiece normalizes text (%s%s) and llama.cpp does not; text that normalization "
                    "changes will be tokenized differently", spm_file, spm.normalizer_name or "default rule",
                    ", removes extra whitespace" if spm.remove_extra_whitespaces else "")
    if spm.treat_whitespace_as_suffix:
        raise ConfigError(f"{spm_file}: treat_whitespace_as_suffix SentencePiece models are not tokenized that "
                          "way by llama.cpp's SentencePiece tokenizer")
    vocab = _Vocab("llama", "default", spm.add_dummy_prefix)
    for token_id, piece in enumerate(spm.pieces):
        vocab.set(token_id, piece.text, piece.type, piece.score)
    return vocab


def _byte_fallback_bpe_vocab(tok: dict, tokenizer_file: Path) -> _Vocab:
    """SentencePiece BPE as transformers stores it: merges instead of scores. llama.cpp merges the adjacent pair
    whose concatenation has the highest score, so each token scores minus the rank of its first merge."""
    model = tok["model"]
    merges = _merge_pairs(model)
    first_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first_rank.setdefault(left + right, rank)
    never_merged = -float(len(merges) + 1)
    vocab = _Vocab("llama", "default", _prepends_space(tok))
    for text, token_id in model["vocab"].items():
        if text == model.get("unk_token"):
            vocab.set(token_id, text, UNKNOWN)
        elif _BYTE_PIECE.fullmatch(text):
            vocab.set(token_id, text, BYTE)
        else:
            vocab.set(token_id, text, NORMAL, -float(first_rank[text]) if text in first_rank else never_merged)
    if not any(t == BYTE for t in vocab.types.values()):
        raise ConfigError(f"{tokenizer_file}: a byte-fallback BPE tokenizer without <0x00>..<0xFF> byte tokens; "
                          "llama.cpp's SentencePiece tokenizer needs them")
    return vocab


def _prepends_space(tok: dict) -> bool:
    """Whether the tokenizer puts '▁' before the text (Metaspace prepend, or the legacy Prepend normalizer)."""
    for pre_tokenizer in _flatten(tok.get("pre_tokenizer"), "pretokenizers"):
        if pre_tokenizer.get("type") == "Metaspace":
            default = "always" if pre_tokenizer.get("add_prefix_space", True) else "never"
            return pre_tokenizer.get("prepend_scheme", default) != "never"
    return any(n.get("type") == "Prepend" and n.get("prepend") == SPIECE_UNDERLINE
               for n in _flatten(tok.get("normalizer"), "normalizers"))


def _flatten(node: dict | None, list_key: str) -> list[dict]:
    """The leaves of a tokenizer.json Sequence (normalizers or pre-tokenizers)."""
    if not node:
        return []
    children = node.get(list_key)
    return [leaf for child in children for leaf in _flatten(child, list_key)] if children else [node]


def _added_tokens(folder: Path, tok: dict, tok_config: dict) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) from tokenizer.json, tokenizer_config.json's added_tokens_decoder and
    added_tokens.json, later files overriding earlier ones."""
    added = {a["id"]: (a["content"], bool(a.get("special"))) for a in tok.get("added_tokens", [])}
    for token_id, data in tok_config.get("added_tokens_decoder", {}).items():
        added[int(token_id)] = (data["content"], bool(data.get("special")))
    for text, token_id in _read_json(folder / "added_tokens.json").items():
        added.setdefault(token_id, (text, False))
    return added


def _special_metadata(folder: Path, vocab: _Vocab, tok_config: dict, config: dict) -> dict[str, Value]:
    meta: dict[str, Value] = {}
    token_ids = vocab.token_ids()
    specials = special_tokens(folder)  # BOS/EOS and whether they are added: the rule calibration and eval follow
    texts = {"bos": specials.bos, "eos": specials.eos, "eot": specials.eot}
    for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id"), ("eot", "eot_token_id")):
        token = texts[kind] if kind in texts else _token_content(tok_config.get(f"{kind}_token"))
        token_id = token_ids.get(token) if token is not None else config.get(f"{kind}_token_id")
        if isinstance(token_id, int):
            meta[f"tokenizer.ggml.{key}"] = u32(token_id)
    for kind, add in (("bos", specials.add_bos), ("eos", specials.add_eos)):
        if add is not None:
            meta[f"tokenizer.ggml.add_{kind}_token"] = boolean(add)
    template = tok_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        meta["tokenizer.chat_template"] = string(template)
    return meta
