"""Checkpoint readers: hand out tensors one at a time, by name, in float32 on a requested device."""

from quantkit.source.hf import HFCheckpoint, TensorInfo


def open_checkpoint(path) -> HFCheckpoint:
    return HFCheckpoint(path)


__all__ = ["HFCheckpoint", "TensorInfo", "open_checkpoint"]
