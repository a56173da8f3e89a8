"""Architecture registry: config.json's `architectures` / `model_type` -> an Architecture."""

from __future__ import annotations

from collections.abc import Iterable

from quantkit.arch.base import Architecture, LayerSpec, LinearSpec
from quantkit.arch.deepseek_v3 import DeepseekV3Architecture
from quantkit.arch.llama import LlamaArchitecture
from quantkit.arch.qwen2 import Qwen2Architecture
from quantkit.errors import ConfigError, UnsupportedArchitectureError

ARCHITECTURES: tuple[type[Architecture], ...] = (LlamaArchitecture, Qwen2Architecture, DeepseekV3Architecture)


def architecture_class(config: dict, origin: str = "config.json") -> type[Architecture]:
    declared = list(config.get("architectures") or [])
    for cls in ARCHITECTURES:
        if any(a in cls.hf_architectures for a in declared):
            return cls
    model_type = config.get("model_type")
    for cls in ARCHITECTURES:
        if model_type in cls.model_types:
            return cls
    supported = ", ".join(f"{c.name} ({', '.join(c.hf_architectures)})" for c in ARCHITECTURES)
    shown = ", ".join(declared) or "none"
    raise UnsupportedArchitectureError(
        f"{origin}: unsupported architecture: config.json declares architectures [{shown}], model_type {model_type!r}; "
        f"quantkit supports {supported}")


def load_architecture(config: dict | None, tensor_names: Iterable[str] | None = None,
                      origin: str = "config.json") -> Architecture:
    """`origin` names the checkpoint in error messages."""
    if config is None:
        raise ConfigError(f"{origin}: no config.json; quantkit needs the model's config.json to know its architecture")
    return architecture_class(config, origin)(config, tensor_names)


__all__ = ["ARCHITECTURES", "Architecture", "LayerSpec", "LinearSpec", "architecture_class", "load_architecture"]
