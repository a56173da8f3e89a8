"""llama.cpp's llama and qwen2: names, hyperparameters, Llama's q/k row permutation, llama3 rope factors."""

from __future__ import annotations

import torch
from gguf.constants import MODEL_TENSOR, Keys

from quantkit.arch.base import InputGroup, rope_inv_freq
from quantkit.errors import ConfigError
from quantkit.formats.gguf.file import Value, f32, string, u32
from quantkit.formats.gguf.tensors import GGUFMapping, GGUFTensor, ImatrixTarget, gguf_tensor, tensor_name

# checkpoint module (inside a layer) -> llama.cpp tensor
_NAMES = {"self_attn.q_proj": MODEL_TENSOR.ATTN_Q, "self_attn.k_proj": MODEL_TENSOR.ATTN_K,
          "self_attn.v_proj": MODEL_TENSOR.ATTN_V, "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
          "mlp.gate_proj": MODEL_TENSOR.FFN_GATE, "mlp.up_proj": MODEL_TENSOR.FFN_UP,
          "mlp.down_proj": MODEL_TENSOR.FFN_DOWN, "input_layernorm": MODEL_TENSOR.ATTN_NORM,
          "post_attention_layernorm": MODEL_TENSOR.FFN_NORM}


class LlamaMapping(GGUFMapping):
    gguf_arch = "llama"
    architectures = ("llama",)
    rope_pairs_adjacent = True  # llama.cpp runs llama with NORM rope (pairs 2i, 2i+1): q/k rows are permuted

    def hparams(self) -> dict[str, Value]:
        m, a = self.arch, self.gguf_arch
        hp = {Keys.LLM.CONTEXT_LENGTH.format(arch=a): u32(m.config.get("max_position_embeddings", 4096)),
              Keys.LLM.EMBEDDING_LENGTH.format(arch=a): u32(m.hidden_size),
              Keys.LLM.BLOCK_COUNT.format(arch=a): u32(m.num_layers),
              Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a): u32(m.intermediate_size),
              Keys.Attention.HEAD_COUNT.format(arch=a): u32(m.num_heads),
              Keys.Attention.HEAD_COUNT_KV.format(arch=a): u32(m.num_kv_heads),
              Keys.Rope.FREQ_BASE.format(arch=a): f32(m.rope_params["rope_theta"]),
              Keys.Attention.LAYERNORM_RMS_EPS.format(arch=a): f32(m.rms_norm_eps),
              Keys.LLM.VOCAB_SIZE.format(arch=a): u32(m.vocab_size),
              Keys.Rope.DIMENSION_COUNT.format(arch=a): u32(m.head_dim)}
        if m.head_dim != m.hidden_size // m.num_heads:
            hp[Keys.Attention.KEY_LENGTH.format(arch=a)] = u32(m.head_dim)
            hp[Keys.Attention.VALUE_LENGTH.format(arch=a)] = u32(m.head_dim)
        rope_type = m.rope_params["rope_type"]
        if rope_type == "linear":
            hp[Keys.Rope.SCALING_TYPE.format(arch=a)] = string("linear")
            hp[Keys.Rope.SCALING_FACTOR.format(arch=a)] = f32(m.rope_params["factor"])
        elif rope_type not in ("default", "llama3"):
            raise ConfigError(f"rope type {rope_type!r} cannot be written for llama.cpp's {a} architecture")
        return hp

    def extra_tensors(self) -> list[GGUFTensor]:
        m = self.arch
        if m.rope_params["rope_type"] != "llama3":
            return []
        # llama.cpp has no llama3 rope keys; it divides each rope frequency by rope_freqs[i] (convert_hf_to_gguf).
        base = rope_inv_freq({**m.rope_params, "rope_type": "default"}, m.head_dim, 0)[0]
        scaled = rope_inv_freq(m.rope_params, m.head_dim, 0)[0]
        factors = (base / scaled).float()

        def pieces(weights):
            yield factors.reshape(1, -1)

        return [GGUFTensor(tensor_name(MODEL_TENSOR.ROPE_FREQS), tuple(factors.shape), pieces)]  # no source

    def layer_tensors(self, index: int) -> list[GGUFTensor]:
        m, p = self.arch, f"model.layers.{index}."
        heads = {MODEL_TENSOR.ATTN_Q: m.num_heads, MODEL_TENSOR.ATTN_K: m.num_kv_heads}
        tensors = []
        for hf_name, shape in m.layer_spec(index).tensor_shapes().items():
            stem, kind = hf_name[len(p):].rsplit(".", 1)
            kind_of = _NAMES[stem]
            transform = inverse = None
            if self.rope_pairs_adjacent and kind_of in heads:
                transform, inverse = _rope_pairs_permutation(heads[kind_of])
            tensors.append(gguf_tensor(tensor_name(kind_of, index, kind), hf_name, shape, transform, inverse))
        return tensors

    def imatrix_targets(self, group: InputGroup) -> list[ImatrixTarget]:
        layer = int(group.key.split(".")[2])
        prefix = f"model.layers.{layer}."
        return [ImatrixTarget(tensor_name(_NAMES[w[len(prefix):-len(".weight")]], layer)) for w in group.linears]


class Qwen2Mapping(LlamaMapping):
    gguf_arch = "qwen2"
    architectures = ("qwen2",)
    rope_pairs_adjacent = False  # llama.cpp runs qwen2 with NEOX rope, HF's own row order


def _rope_pairs_permutation(n_heads: int):
    """HF's rotate-half rows (i, i + d/2) of each head -> adjacent pairs (2i, 2i + 1), as convert_hf_to_gguf's
    LlamaModel.permute; only output rows move, so input columns (and importance vectors) are unchanged."""

    def permute(w: torch.Tensor) -> torch.Tensor:
        rows = w.shape[0]
        return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    def unpermute(w: torch.Tensor) -> torch.Tensor:
        rows = w.shape[0]
        return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    return permute, unpermute
