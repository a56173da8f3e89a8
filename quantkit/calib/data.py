"""Calibration text -> samples: the bundled calibration split by default, or a file (plain text, or JSON lines
with a `text` field), tokenized with the model's tokenizer and cut into samples of `ctx` tokens, each starting
with the model's BOS where it adds one (as llama-imatrix does)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from quantkit.errors import ConfigError
from quantkit.model import Model

log = logging.getLogger(__name__)


def default_calibration_text() -> tuple[str, str]:
    from quantkit.bundled import textsets

    return textsets.text("calibration"), f"stdlib-calibration (python {textsets.python_version()})"


def read_calibration(path: Path | None) -> tuple[str, str]:
    """(text, dataset name) of a calibration file, or of the bundled calibration split when `path` is None."""
    if path is None:
        return default_calibration_text()
    if not path.is_file():
        raise ConfigError(f"{path}: no such calibration file")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix not in (".jsonl", ".json"):
        return raw, path.name
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}:{number}: expected a JSON object with a \"text\" field per line") from None
    return "\n\n".join(texts), path.name


def tokenize_file(model: Model, text: str) -> torch.Tensor:
    return torch.tensor(model.tokenizer("tokenize the calibration text with").encode(
        text, add_special_tokens=False).ids, dtype=torch.long)


def chunks(model: Model, tokens: torch.Tensor, ctx: int, count: int) -> list[torch.Tensor]:
    """The first `count` non-overlapping chunks of `ctx` tokens, each starting with the model's BOS if any."""
    out = []
    for i in range(count):
        ids = tokens[i * ctx:(i + 1) * ctx].clone()
        if model.bos is not None:
            ids[0] = model.bos
        out.append(ids)
    return out


def calibration_samples(model: Model, path: Path | None, samples: int, ctx: int) -> list[torch.Tensor]:
    """`samples` token sequences of `ctx` tokens, consecutive from the start of the text."""
    text, name = read_calibration(path)
    return _samples(model, tokenize_file(model, text), name, samples, ctx)


def scoring_samples(model: Model, path: Path | None, samples: int, ctx: int, fitted: int) -> list[torch.Tensor]:
    """The samples a measurement of candidates fitted to the first `fitted` samples (GPTQ's Hessians; 0: none) is
    scored on: the `samples` after those when the text holds them, so the costs are out of sample as an eval of
    the output on other text is; else the first ones (in sample, logged: the costs come out optimistic)."""
    text, name = read_calibration(path)
    tokens = tokenize_file(model, text)
    if fitted and len(tokens) < (fitted + samples) * ctx:
        log.warning("the calibration text %s is too short to score the measurement on %d samples of %d tokens "
                    "beyond the %d the encoding is fitted to; scoring on samples it was fitted to (optimistic costs)",
                    name, samples, ctx, fitted)
        fitted = 0
    return _samples(model, tokens[fitted * ctx:], name, samples, ctx)


def _samples(model: Model, tokens: torch.Tensor, name: str, samples: int, ctx: int) -> list[torch.Tensor]:
    if samples < 1 or ctx < 2:
        raise ConfigError(f"calibration needs at least one sample of at least 2 tokens (got {samples} x {ctx})")
    if len(tokens) < samples * ctx:
        raise ConfigError(f"the calibration text {name} has {len(tokens)} tokens; {samples} samples of {ctx} tokens "
                          f"need {samples * ctx}: give more text (--calib), fewer samples (--calib-samples) or a "
                          "shorter context (--calib-ctx)")
    return chunks(model, tokens, ctx, samples)
