"""Running calibration text through quantkit's layer-by-layer forward and collecting statistics."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from quantkit.arch.base import Weights
from quantkit.calib.imatrix import Imatrix
from quantkit.errors import ConfigError, SourceError
from quantkit.model import Model
from quantkit.progress import Progress, ProgressCallback
from quantkit.tokenizer import added_bos, load_tokenizer

log = logging.getLogger(__name__)


def _folder(model: Model) -> Path:
    return model.source.path if model.source.path.is_dir() else model.source.path.parent


def tokenize_file(model: Model, text: str) -> torch.Tensor:
    tokenizer = load_tokenizer(_folder(model), "tokenize the calibration text with")
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)


def collect_imatrix(model: Model, tokens: torch.Tensor, ctx: int = 512, max_chunks: int | None = None,
                    dataset: str = "", progress: ProgressCallback | None = None) -> Imatrix:
    """llama-imatrix's statistics from non-overlapping chunks of `ctx` tokens (a partial last chunk is
    dropped, as llama-imatrix does)."""
    n_chunks = len(tokens) // ctx
    if max_chunks:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks == 0:
        raise ConfigError(f"the calibration text has {len(tokens)} tokens, fewer than one chunk of --ctx {ctx}; "
                          "give more text or a smaller --ctx")
    imatrix = Imatrix(datasets=[dataset], chunk_size=ctx)
    bos = added_bos(_folder(model), model.arch.config)
    arch, weights = model.arch, _finite_weights(model.weights())
    arch.observe = imatrix.add
    try:
        if progress is not None:
            progress(Progress("imatrix", 0, n_chunks, "chunks"))
        for chunk in range(n_chunks):
            ids = tokens[chunk * ctx:(chunk + 1) * ctx].clone()
            if bos is not None:
                ids[0] = bos
            arch.forward(weights, ids.to(model.device))
            _check_finite(imatrix, chunk)
            imatrix.chunk_count = chunk + 1
            if progress is not None:
                progress(Progress("imatrix", chunk + 1, n_chunks, "chunks"))
    finally:
        arch.observe = None
    for name, counts in imatrix.expert_counts().items():
        unused = [e for e, c in enumerate(counts) if c == 0]
        if unused:
            log.warning("%s: experts %s received no calibration tokens; their importance is 1.0 (as llama.cpp "
                        "does), i.e. they are quantized as without an imatrix", name, unused)
    return imatrix


def _finite_weights(weights: Weights) -> Weights:
    """`weights` that refuse a tensor with NaN/Inf at its first read: statistics through it would be NaN, and
    llama-quantize would use them without a word."""
    checked: set[str] = set()

    def read(name: str) -> torch.Tensor:
        tensor = weights(name)
        if name not in checked:
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise SourceError(f"tensor {name} has {bad} NaN/Inf value(s); the checkpoint is corrupt or was "
                                  "saved from a diverged run; nothing was written")
            checked.add(name)
        return tensor

    return read


def _check_finite(imatrix: Imatrix, chunk: int) -> None:
    """Finite weights can still overflow float32 activations; such an entry would poison every chunk after."""
    for name, sums in imatrix.sums.items():
        if not torch.isfinite(sums).all():
            raise SourceError(f"imatrix entry {name} became NaN/Inf at chunk {chunk + 1}: the model's activations "
                              "overflow on this text (the checkpoint is likely broken); nothing was written")


def default_calibration_text() -> tuple[str, str]:
    from quantkit.bundled import textsets

    return textsets.text("calibration"), f"stdlib-calibration (python {textsets.python_version()})"


def read_calibration(path: Path | None) -> tuple[str, str]:
    if path is None:
        return default_calibration_text()
    if not path.is_file():
        raise ConfigError(f"{path}: no such calibration file")
    return path.read_text(encoding="utf-8", errors="replace"), path.name
