"""Qwen2 (R1-Distill-Qwen): Llama's layer with q/k/v biases; embeddings tied or untied."""

from __future__ import annotations

from quantkit.arch.llama import LlamaArchitecture


class Qwen2Architecture(LlamaArchitecture):
    name = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)

    def __init__(self, config, tensor_names=None):
        super().__init__(config, tensor_names)
        # Qwen2 always has q/k/v biases and never an o_proj or MLP bias (there is no attention_bias key).
        self.qkv_bias, self.o_bias, self.mlp_bias = True, False, False
