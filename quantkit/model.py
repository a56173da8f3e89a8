"""A checkpoint opened once, with everything downstream asks of it: its config, architecture, weights (through
its input decoder), tokenizer and BOS rule. Calibration, evaluation and conversion start from here."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from quantkit.arch import Architecture, load_architecture
from quantkit.arch.base import Weights
from quantkit.source import HFCheckpoint, open_checkpoint
from quantkit.tokenizer import added_bos, load_tokenizer


class Model:
    def __init__(self, path, device: str | torch.device = "cpu"):
        self.source: HFCheckpoint = open_checkpoint(path)
        self.config: dict | None = self.source.config
        self.arch: Architecture = load_architecture(self.config, (t.name for t in self.source.tensors()),
                                                    str(self.source.path))
        self.arch.check_tensors((t.name for t in self.source.tensors()), str(self.source.path))
        self.device = torch.device(device)
        self._tokenizer = None

    @property
    def folder(self) -> Path:
        """The folder holding config.json and the tokenizer files."""
        return self.source.path if self.source.path.is_dir() else self.source.path.parent

    def tokenizer(self, purpose: str = "tokenize text"):
        """The folder's tokenizer.json (loaded once); `purpose` completes the error when there is none."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder, purpose)
        return self._tokenizer

    @cached_property
    def bos(self) -> int | None:
        """The BOS token llama.cpp's tools put at every chunk start, or None when the model adds none."""
        return added_bos(self.folder, self.config)

    def weights(self) -> Weights:
        return lambda name: self.source.read(name, device=self.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.arch.forward(self.weights(), input_ids.to(self.device))

    def close(self) -> None:
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
