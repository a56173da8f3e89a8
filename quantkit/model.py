"""A checkpoint opened together with its architecture: what calibration, evaluation and conversion start from."""

from __future__ import annotations

import torch

from quantkit.arch import Architecture, load_architecture
from quantkit.arch.base import Weights
from quantkit.source import HFCheckpoint, open_checkpoint


class Model:
    def __init__(self, path, device: str | torch.device = "cpu"):
        self.source: HFCheckpoint = open_checkpoint(path)
        self.arch: Architecture = load_architecture(self.source.config, (t.name for t in self.source.tensors()),
                                                    str(self.source.path))
        self.arch.check_tensors((t.name for t in self.source.tensors()), str(self.source.path))
        self.device = torch.device(device)

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
