"""Bits per weight: the one definition behind every bpw quantkit prints (convert's plan, eval's report)."""

from __future__ import annotations

from collections.abc import Iterable


def bits_per_weight(tensors: Iterable[tuple[int, int]]) -> float:
    """8 x stored bytes / elements, summed over every tensor of the model, given as (nbytes, n_elements) pairs:
    llama.cpp's BPW (llama-model-loader.cpp sums ggml_nbytes and ggml_nelements over all weights, norms and
    embeddings included, and prints n_bytes*8/n_elements), so a GGUF reads the same here as in llama.cpp's log.
    Tensor data only: not the file's metadata or alignment padding. Block scales count as stored bytes (an FP8
    weight's *_scale_inv included), not as elements."""
    nbytes = n_elements = 0
    for size, count in tensors:
        nbytes += size
        n_elements += count
    return 8 * nbytes / n_elements if n_elements else 0.0
