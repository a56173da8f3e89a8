"""llama.cpp's deepseek2 (DeepSeek-V3/R1), MLA profile as convert_hf_to_gguf writes it: kv_b_proj split per head
into attn_k_b (transposed) and attn_v_b, routed experts stacked into 3-D tensors, sigmoid gating."""

from __future__ import annotations

import torch
from gguf.constants import MODEL_TENSOR as T
from gguf.constants import Keys

from quantkit.arch.base import InputGroup
from quantkit.errors import ConfigError
from quantkit.formats.gguf.file import Value, boolean, f32, string, u32
from quantkit.formats.gguf.tensors import (
    GGUFMapping,
    GGUFTensor,
    ImatrixTarget,
    gguf_stacked,
    gguf_tensor,
    tensor_name,
)

# checkpoint module (inside a layer) -> llama.cpp tensor, for the 2-D ones named one to one
_NAMES = {"input_layernorm": T.ATTN_NORM, "post_attention_layernorm": T.FFN_NORM,
          "self_attn.kv_a_layernorm": T.ATTN_KV_A_NORM, "self_attn.kv_a_proj_with_mqa": T.ATTN_KV_A_MQA,
          "self_attn.o_proj": T.ATTN_OUT, "self_attn.q_a_layernorm": T.ATTN_Q_A_NORM, "self_attn.q_a_proj": T.ATTN_Q_A,
          "self_attn.q_b_proj": T.ATTN_Q_B, "self_attn.q_proj": T.ATTN_Q, "mlp.gate_proj": T.FFN_GATE,
          "mlp.up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN, "mlp.gate": T.FFN_GATE_INP,
          "mlp.shared_experts.gate_proj": T.FFN_GATE_SHEXP, "mlp.shared_experts.up_proj": T.FFN_UP_SHEXP,
          "mlp.shared_experts.down_proj": T.FFN_DOWN_SHEXP}
_EXPERTS = {"gate_proj": T.FFN_GATE_EXP, "up_proj": T.FFN_UP_EXP, "down_proj": T.FFN_DOWN_EXP}


class Deepseek2Mapping(GGUFMapping):
    gguf_arch = "deepseek2"
    architectures = ("deepseek_v3",)

    def hparams(self) -> dict[str, Value]:
        m, a = self.arch, self.gguf_arch
        llm, att, rope = Keys.LLM, Keys.Attention, Keys.Rope
        dense = m.first_k_dense_replace if m.n_routed_experts else m.num_layers
        hp = {llm.CONTEXT_LENGTH: u32(m.config.get("max_position_embeddings", 4096)),
              llm.EMBEDDING_LENGTH: u32(m.hidden_size), llm.BLOCK_COUNT: u32(m.num_layers),
              llm.FEED_FORWARD_LENGTH: u32(m.intermediate_size),
              att.HEAD_COUNT: u32(m.num_heads),
              # MLA runs as MQA over the compressed latent: one kv head of kv_lora + rope dims
              att.HEAD_COUNT_KV: u32(1),
              att.KEY_LENGTH: u32(m.kv_lora_rank + m.qk_rope_head_dim),
              att.VALUE_LENGTH: u32(m.kv_lora_rank),
              att.KEY_LENGTH_MLA: u32(m.qk_head_dim),
              att.VALUE_LENGTH_MLA: u32(m.v_head_dim),
              att.KV_LORA_RANK: u32(m.kv_lora_rank),
              att.LAYERNORM_RMS_EPS: f32(m.rms_norm_eps),
              rope.DIMENSION_COUNT: u32(m.qk_rope_head_dim),
              rope.FREQ_BASE: f32(m.rope_params["rope_theta"]),
              llm.VOCAB_SIZE: u32(m.vocab_size),
              llm.LEADING_DENSE_BLOCK_COUNT: u32(dense),
              llm.EXPERT_FEED_FORWARD_LENGTH: u32(m.moe_intermediate_size),
              llm.EXPERT_COUNT: u32(m.n_routed_experts),
              llm.EXPERT_USED_COUNT: u32(m.experts_per_token),
              llm.EXPERT_SHARED_COUNT: u32(m.n_shared_experts),
              llm.EXPERT_WEIGHTS_SCALE: f32(m.routed_scaling_factor),
              llm.EXPERT_WEIGHTS_NORM: boolean(m.norm_topk_prob),
              llm.EXPERT_GATING_FUNC: u32(2),  # sigmoid (LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID)
              llm.EXPERT_GROUP_COUNT: u32(m.n_group),
              llm.EXPERT_GROUP_USED_COUNT: u32(m.topk_group)}
        if m.q_lora_rank:
            hp[att.Q_LORA_RANK] = u32(m.q_lora_rank)
        params = m.rope_params
        if params["rope_type"] == "yarn":
            hp.update({rope.SCALING_TYPE: string("yarn"), rope.SCALING_FACTOR: f32(params["factor"]),
                       rope.SCALING_ORIG_CTX_LEN: u32(params["original_max_position_embeddings"]),
                       rope.SCALING_YARN_BETA_FAST: f32(params.get("beta_fast", 32.0)),
                       rope.SCALING_YARN_BETA_SLOW: f32(params.get("beta_slow", 1.0)),
                       # the loader divides this key by 0.1 (convert writes 0.1 * mscale_all_dim)
                       rope.SCALING_YARN_LOG_MUL: f32(0.1 * params.get("mscale_all_dim", 0.0))})
        elif params["rope_type"] != "default":
            raise ConfigError(f"rope type {params['rope_type']!r} cannot be written for llama.cpp's deepseek2")
        return {key.format(arch=a): value for key, value in hp.items()}

    def layer_tensors(self, index: int) -> list[GGUFTensor]:
        m, p = self.arch, f"model.layers.{index}."
        spec = m.layer_spec(index)
        heads, lora = m.num_heads, m.kv_lora_rank
        nope, v_dim = m.qk_nope_head_dim, m.v_head_dim
        t = []
        for hf_name, shape in spec.tensor_shapes().items():
            stem, _, kind = hf_name[len(p):].rpartition(".")
            if hf_name.endswith("mlp.gate.e_score_correction_bias"):
                t.append(gguf_tensor(tensor_name(T.FFN_EXP_PROBS_B, index, "bias"), hf_name, shape))
            elif stem in _NAMES:  # kv_b and the routed experts are built below
                t.append(gguf_tensor(tensor_name(_NAMES[stem], index, kind), hf_name, shape))

        # kv_b_proj [heads * (nope + v), lora], per head k_nope rows then v rows: split into per-head k_b
        # (transposed, [heads, lora, nope]) and v_b ([heads, v, lora]), one piece per head.
        kv_b_name = p + "self_attn.kv_b_proj.weight"

        def kv_b_pieces(part: str):
            def pieces(weights):
                kv_b = weights(kv_b_name).view(heads, nope + v_dim, lora)
                for head in kv_b:
                    yield head[:nope].T.contiguous() if part == "k" else head[nope:]
            return pieces

        t += [GGUFTensor(tensor_name(T.ATTN_K_B, index), (heads, lora, nope), kv_b_pieces("k")),
              GGUFTensor(tensor_name(T.ATTN_V_B, index), (heads, v_dim, lora), kv_b_pieces("v"))]
        if not m.is_moe_layer(index):
            return t
        n_exp, inter = m.n_routed_experts, m.moe_intermediate_size
        shapes = {"gate_proj": (n_exp, inter, m.hidden_size), "up_proj": (n_exp, inter, m.hidden_size),
                  "down_proj": (n_exp, m.hidden_size, inter)}
        if m.fused_experts:
            gate_up, down = p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"
            t += [_fused_expert_tensor(tensor_name(T.FFN_GATE_EXP, index), gate_up, shapes["gate_proj"], 0),
                  _fused_expert_tensor(tensor_name(T.FFN_UP_EXP, index), gate_up, shapes["up_proj"], 1),
                  _fused_expert_tensor(tensor_name(T.FFN_DOWN_EXP, index), down, shapes["down_proj"])]
        else:
            for proj, kind in _EXPERTS.items():
                sources = [f"{p}mlp.experts.{e}.{proj}.weight" for e in range(n_exp)]
                t.append(gguf_stacked(tensor_name(kind, index), sources, shapes[proj]))
        return t

    def imatrix_targets(self, group: InputGroup) -> list[ImatrixTarget]:
        m = self.arch
        layer = int(group.key.split(".")[2])
        stem = group.key[len(f"model.layers.{layer}."):]
        if group.expert is not None:  # mlp.experts.E.gate_proj (gate and up) or mlp.experts.E.down_proj
            n = m.n_routed_experts
            projs = ("gate_proj", "up_proj") if stem.endswith("gate_proj") else ("down_proj",)
            return [ImatrixTarget(tensor_name(_EXPERTS[proj], layer), group.expert, n, True) for proj in projs]
        if stem == "self_attn.kv_b_proj":  # llama.cpp has no kv_b: see probe_targets
            return []
        prefix = f"model.layers.{layer}."
        return [ImatrixTarget(tensor_name(_NAMES[w[len(prefix):-len(".weight")]], layer)) for w in group.linears]

    def probe_targets(self, layer: int) -> dict[str, list[ImatrixTarget]]:
        heads, a = self.arch.num_heads, f"model.layers.{layer}.self_attn."
        return {a + "absorbed_k": [ImatrixTarget(tensor_name(T.ATTN_K_B, layer), None, heads)],
                a + "absorbed_v": [ImatrixTarget(tensor_name(T.ATTN_V_B, layer), None, heads)]}

    def weights_from_gguf(self, read):
        plain = super().weights_from_gguf(read)
        lora = self.arch.kv_lora_rank

        def weights(name: str) -> torch.Tensor:
            if not name.endswith("self_attn.kv_b_proj.weight"):
                return plain(name)
            layer = int(name.split(".")[2])
            k_b, v_b = read(tensor_name(T.ATTN_K_B, layer)), read(tensor_name(T.ATTN_V_B, layer))
            return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, lora)  # [H, lora, nope], [H, v, lora]

        return weights


def _fused_expert_tensor(name: str, source: str, shape: tuple[int, ...], half: int | None = None) -> GGUFTensor:
    """A stacked expert tensor from transformers' fused layout ([E, 2I, H] gate_up, or [E, H, I] down)."""

    def pieces(weights):
        fused = weights(source)
        for expert in fused:
            yield expert if half is None else expert.chunk(2, dim=0)[half]

    return GGUFTensor(name, shape, pieces)
