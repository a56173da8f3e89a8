"""A model folder's tokenizer (tokenizer.json, through the `tokenizers` library) and its BOS rule, shared by
calibration and evaluation so both feed the forward the tokens llama.cpp's tools would."""

from __future__ import annotations

import json
from pathlib import Path

from quantkit.errors import ConfigError


def load_tokenizer(folder: Path, purpose: str):
    from tokenizers import Tokenizer

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"{folder}: no tokenizer.json to {purpose}")
    return Tokenizer.from_file(str(file))


def added_bos(folder: Path, config: dict) -> int | None:
    """The BOS llama-imatrix and llama-perplexity put at every chunk start: the config's bos_token_id when
    tokenizer_config.json sets add_bos_token, else None."""
    file = folder / "tokenizer_config.json"
    if file.is_file() and json.loads(file.read_text()).get("add_bos_token", False):
        return config.get("bos_token_id")
    return None
