"""Test-model factory: tiny, complete Hugging Face model folders with random weights."""

from quantkit.testing.factory import PRESETS, make_tiny_model

__all__ = ["PRESETS", "make_tiny_model"]
