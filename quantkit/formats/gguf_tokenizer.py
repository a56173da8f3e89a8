"""The tokenizer.* metadata of a GGUF file, from a HF folder's tokenizer.json / tokenizer_config.json.

Byte-level BPE ("gpt2" in llama.cpp): tokens, token types, merges, the pre-tokenizer name, special ids,
add_bos/add_eos and the chat template, as convert_hf_to_gguf.py and gguf-py's SpecialVocab write them.
llama.cpp picks its pre-tokenizer by name, so the name is chosen from the pre-tokenizer's split regexes
(convert identifies known tokenizers by hashing their output on a fixed text, which cannot recognise a
tokenizer trained locally with a known regex); `pre` overrides the choice.
"""

from __future__ import annotations

import json
from pathlib import Path

from gguf.constants import GGUFValueType

from quantkit.errors import ConfigError
from quantkit.formats.gguf_file import Value, array, boolean, string, u32

# llama.cpp token types (llama-vocab.h LLAMA_TOKEN_TYPE_*)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = _QWEN2_REGEX.replace(r"\p{N}|", r"\p{N}{1,3}|")
_DEEPSEEK_V3_MARKERS = (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+")

# llama.cpp pre-tokenizer names this module can recognise, and the regexes that identify them
KNOWN_PRE = {"qwen2": "Qwen2 / R1-Distill-Qwen", "llama-bpe": "Llama 3 / R1-Distill-Llama",
             "deepseek-v3": "DeepSeek-V3 / R1"}


def _split_patterns(pre_tokenizer: dict | None) -> list[str]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [p for sub in pre_tokenizer.get("pretokenizers", []) for p in _split_patterns(sub)]
    if pre_tokenizer.get("type") == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        return [pattern.get("Regex") or pattern.get("String") or ""]
    return []


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


def tokenizer_metadata(folder: Path, vocab_size: int, config: dict, pre: str | None = None) -> dict[str, Value]:
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        if (folder / "tokenizer.model").is_file():
            raise ConfigError(f"{folder}: SentencePiece tokenizers (tokenizer.model) are not supported yet; "
                              "quantkit writes byte-level BPE tokenizers (tokenizer.json)")
        raise ConfigError(f"{folder}: no tokenizer.json; GGUF files carry the tokenizer, so the model folder "
                          "needs its tokenizer files")
    tok = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"{tokenizer_file}: tokenizer model {model.get('type')!r} is not supported; "
                          "quantkit writes byte-level BPE tokenizers")
    tok_config_file = folder / "tokenizer_config.json"
    tok_config = json.loads(tok_config_file.read_text(encoding="utf-8")) if tok_config_file.is_file() else {}

    chosen_pre = pre or detect_pre(tok)
    if chosen_pre is None:
        raise ConfigError(f"{tokenizer_file}: its pre-tokenizer is not one quantkit recognises "
                          f"({', '.join(f'{k} = {v}' for k, v in KNOWN_PRE.items())}); llama.cpp needs the right "
                          "name to split text the same way: pass it with --tokenizer-pre NAME")

    id_to_token: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in tok.get("added_tokens", []):
        id_to_token[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    size = max(vocab_size, max(id_to_token) + 1)
    tokens, token_types = [], []
    for i in range(size):
        if i in id_to_token:
            tokens.append(id_to_token[i] or f"[EMPTY_{i}]")
            token_types.append(types.get(i, NORMAL))
        else:  # ids the config reserves beyond the tokenizer (DeepSeek-V3 pads its vocabulary)
            tokens.append(f"[PAD{i}]")
            token_types.append(UNUSED)
    merges = [m if isinstance(m, str) else " ".join(part.replace(" ", "\u0120") for part in m)
              for m in model.get("merges", [])]

    meta = {"tokenizer.ggml.model": string("gpt2"), "tokenizer.ggml.pre": string(chosen_pre),
            "tokenizer.ggml.tokens": array(GGUFValueType.STRING, tokens),
            "tokenizer.ggml.token_type": array(GGUFValueType.INT32, token_types),
            "tokenizer.ggml.merges": array(GGUFValueType.STRING, merges)}
    token_ids = {t: i for i, t in id_to_token.items()}
    for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        token = _token_content(tok_config.get(f"{kind}_token"))
        token_id = token_ids.get(token) if token is not None else config.get(f"{kind}_token_id")
        if isinstance(token_id, int):
            meta[f"tokenizer.ggml.{key}"] = u32(token_id)
    for flag in ("add_bos_token", "add_eos_token"):
        if flag in tok_config:
            meta[f"tokenizer.ggml.{flag}"] = boolean(tok_config[flag])
    template = tok_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        meta["tokenizer.chat_template"] = string(template)
    return meta
