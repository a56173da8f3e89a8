"""DeepSeek-V3 / R1: MLA attention (low-rank q and kv, decoupled rope key), YaRN rope, and MoE layers with
sigmoid scoring, a score-correction bias, group-limited top-k and shared experts after the leading dense
layers. Multi-token-prediction layers (index >= num_hidden_layers) are recognised and skipped.

Routed experts are read in either layout: one 2-D tensor per expert as DeepSeek ships them
(`mlp.experts.N.gate_proj.weight`), or fused 3-D tensors as transformers >= 5 saves them
(`mlp.experts.gate_up_proj` [E, 2*I, H], `mlp.experts.down_proj` [E, H, I]).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

from quantkit.arch.base import (
    Architecture,
    GGUFTensor,
    LayerSpec,
    LinearSpec,
    Rope,
    Weights,
    causal_attention,
    gguf_stacked,
    gguf_tensor,
    rms_norm,
    rope_parameters,
    swiglu,
    yarn_mscale,
)
from quantkit.errors import ConfigError
from quantkit.formats.gguf_file import Value, boolean, f32, string, u32

_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


class DeepseekV3Architecture(Architecture):
    name = "deepseek_v3"
    hf_architectures = ("DeepseekV3ForCausalLM",)
    model_types = ("deepseek_v3",)
    gguf_arch = "deepseek2"

    def __init__(self, config, tensor_names=None):
        super().__init__(config, tensor_names)
        c = config
        self.num_heads = self._require("num_attention_heads")
        self.q_lora_rank = c.get("q_lora_rank")
        self.kv_lora_rank = self._require("kv_lora_rank")
        self.qk_nope_head_dim = self._require("qk_nope_head_dim")
        self.qk_rope_head_dim = self._require("qk_rope_head_dim")
        self.v_head_dim = self._require("v_head_dim")
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.intermediate_size = self._require("intermediate_size")
        self.moe_intermediate_size = c.get("moe_intermediate_size", 0)
        self.n_routed_experts = c.get("n_routed_experts") or 0
        self.n_shared_experts = c.get("n_shared_experts") or 0
        self.experts_per_token = c.get("num_experts_per_tok") or 0
        self.first_k_dense_replace = c.get("first_k_dense_replace") or 0
        self.moe_layer_freq = c.get("moe_layer_freq") or 1
        self.n_group = c.get("n_group") or 1
        self.topk_group = c.get("topk_group") or self.n_group
        self.norm_topk_prob = bool(c.get("norm_topk_prob", True))
        self.routed_scaling_factor = float(c.get("routed_scaling_factor", 1.0))
        self.rope_interleave = bool(c.get("rope_interleave", True))
        # transformers drops these two keys when it saves a config; absent means DeepSeek-V3's choice.
        scoring, topk_method = c.get("scoring_func", "sigmoid"), c.get("topk_method", "noaux_tc")
        if scoring != "sigmoid" or topk_method != "noaux_tc":
            raise ConfigError(f"deepseek_v3 with scoring_func={scoring!r}, topk_method={topk_method!r} is not "
                              "supported; quantkit implements DeepSeek-V3/R1 routing (sigmoid, noaux_tc)")
        if self.n_routed_experts and self.n_routed_experts % self.n_group:
            raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")

        params = self.rope_params = rope_parameters(c)
        self.rope = Rope(params, self.qk_rope_head_dim, c.get("max_position_embeddings", 4096))
        self.softmax_scale = self.qk_head_dim ** -0.5
        if params["rope_type"] != "default" and params.get("mscale_all_dim"):
            self.softmax_scale *= yarn_mscale(params["factor"], params["mscale_all_dim"]) ** 2
        # Called as on_route(layer index, expert indices [tokens, k]) by every MoE layer of the forward.
        self.on_route: Callable[[int, torch.Tensor], None] | None = None
        self.fused_experts = tensor_names is not None and any(
            n.endswith("mlp.experts.gate_up_proj") for n in self.tensor_names)

    def is_moe_layer(self, index: int) -> bool:
        return (self.n_routed_experts > 0 and index >= self.first_k_dense_replace
                and index % self.moe_layer_freq == 0)

    def is_skipped(self, name: str) -> bool:
        match = _LAYER_INDEX.match(name)
        return match is not None and int(match.group(1)) >= self.num_layers

    def is_buffer(self, name: str) -> bool:
        return name.endswith("mlp.gate.e_score_correction_bias")

    # ---- description ----------------------------------------------------------------------------------
    def layer_spec(self, index: int) -> LayerSpec:
        p = f"model.layers.{index}."
        h, heads = self.hidden_size, self.num_heads
        spec = LayerSpec(index)
        lin = spec.linears
        if self.q_lora_rank:
            lin.append(LinearSpec(p + "self_attn.q_a_proj.weight", "attn_q_a", index, (self.q_lora_rank, h)))
            lin.append(LinearSpec(p + "self_attn.q_b_proj.weight", "attn_q_b", index,
                                  (heads * self.qk_head_dim, self.q_lora_rank)))
            spec.others[p + "self_attn.q_a_layernorm.weight"] = (self.q_lora_rank,)
        else:
            lin.append(LinearSpec(p + "self_attn.q_proj.weight", "attn_q", index, (heads * self.qk_head_dim, h)))
        lin.append(LinearSpec(p + "self_attn.kv_a_proj_with_mqa.weight", "attn_kv_a_mqa", index,
                              (self.kv_lora_rank + self.qk_rope_head_dim, h)))
        lin.append(LinearSpec(p + "self_attn.kv_b_proj.weight", "attn_kv_b", index,
                              (heads * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank)))
        lin.append(LinearSpec(p + "self_attn.o_proj.weight", "attn_output", index, (h, heads * self.v_head_dim)))
        spec.others[p + "self_attn.kv_a_layernorm.weight"] = (self.kv_lora_rank,)
        spec.others[p + "input_layernorm.weight"] = (h,)
        spec.others[p + "post_attention_layernorm.weight"] = (h,)

        if not self.is_moe_layer(index):
            inter = self.intermediate_size
            lin += [LinearSpec(p + "mlp.gate_proj.weight", "ffn_gate", index, (inter, h)),
                    LinearSpec(p + "mlp.up_proj.weight", "ffn_up", index, (inter, h)),
                    LinearSpec(p + "mlp.down_proj.weight", "ffn_down", index, (h, inter))]
            return spec

        n_exp, inter = self.n_routed_experts, self.moe_intermediate_size
        spec.routed_experts, spec.experts_per_token = n_exp, self.experts_per_token
        spec.others[p + "mlp.gate.weight"] = (n_exp, h)
        spec.others[p + "mlp.gate.e_score_correction_bias"] = (n_exp,)
        if self.fused_experts:
            lin += [LinearSpec(p + "mlp.experts.gate_up_proj", "ffn_gate_up_exps", index, (n_exp, 2 * inter, h)),
                    LinearSpec(p + "mlp.experts.down_proj", "ffn_down_exps", index, (n_exp, h, inter))]
        else:
            for e in range(n_exp):
                q = f"{p}mlp.experts.{e}."
                lin += [LinearSpec(q + "gate_proj.weight", "ffn_gate_exps", index, (inter, h), e),
                        LinearSpec(q + "up_proj.weight", "ffn_up_exps", index, (inter, h), e),
                        LinearSpec(q + "down_proj.weight", "ffn_down_exps", index, (h, inter), e)]
        if self.n_shared_experts:
            shared = inter * self.n_shared_experts
            q = p + "mlp.shared_experts."
            lin += [LinearSpec(q + "gate_proj.weight", "ffn_gate_shexp", index, (shared, h)),
                    LinearSpec(q + "up_proj.weight", "ffn_up_shexp", index, (shared, h)),
                    LinearSpec(q + "down_proj.weight", "ffn_down_shexp", index, (h, shared))]
        return spec

    # ---- GGUF: llama.cpp's deepseek2, MLA profile (attn_k_b / attn_v_b), as convert_hf_to_gguf writes it --
    def gguf_hparams(self) -> dict[str, Value]:
        a = "deepseek2"
        dense = self.first_k_dense_replace if self.n_routed_experts else self.num_layers
        hp = {f"{a}.context_length": u32(self.config.get("max_position_embeddings", 4096)),
              f"{a}.embedding_length": u32(self.hidden_size), f"{a}.block_count": u32(self.num_layers),
              f"{a}.feed_forward_length": u32(self.intermediate_size),
              f"{a}.attention.head_count": u32(self.num_heads),
              # MLA runs as MQA over the compressed latent: one kv head of kv_lora + rope dims
              f"{a}.attention.head_count_kv": u32(1),
              f"{a}.attention.key_length": u32(self.kv_lora_rank + self.qk_rope_head_dim),
              f"{a}.attention.value_length": u32(self.kv_lora_rank),
              f"{a}.attention.key_length_mla": u32(self.qk_head_dim),
              f"{a}.attention.value_length_mla": u32(self.v_head_dim),
              f"{a}.attention.kv_lora_rank": u32(self.kv_lora_rank),
              f"{a}.attention.layer_norm_rms_epsilon": f32(self.rms_norm_eps),
              f"{a}.rope.dimension_count": u32(self.qk_rope_head_dim),
              f"{a}.rope.freq_base": f32(self.rope_params["rope_theta"]),
              f"{a}.vocab_size": u32(self.vocab_size),
              f"{a}.leading_dense_block_count": u32(dense),
              f"{a}.expert_feed_forward_length": u32(self.moe_intermediate_size),
              f"{a}.expert_count": u32(self.n_routed_experts),
              f"{a}.expert_used_count": u32(self.experts_per_token),
              f"{a}.expert_shared_count": u32(self.n_shared_experts),
              f"{a}.expert_weights_scale": f32(self.routed_scaling_factor),
              f"{a}.expert_weights_norm": boolean(self.norm_topk_prob),
              f"{a}.expert_gating_func": u32(2),  # sigmoid (LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID)
              f"{a}.expert_group_count": u32(self.n_group),
              f"{a}.expert_group_used_count": u32(self.topk_group)}
        if self.q_lora_rank:
            hp[f"{a}.attention.q_lora_rank"] = u32(self.q_lora_rank)
        rope = self.rope_params
        if rope["rope_type"] == "yarn":
            hp.update({f"{a}.rope.scaling.type": string("yarn"), f"{a}.rope.scaling.factor": f32(rope["factor"]),
                       f"{a}.rope.scaling.original_context_length": u32(rope["original_max_position_embeddings"]),
                       f"{a}.rope.scaling.yarn_beta_fast": f32(rope.get("beta_fast", 32.0)),
                       f"{a}.rope.scaling.yarn_beta_slow": f32(rope.get("beta_slow", 1.0)),
                       # the loader divides this key by 0.1 (convert writes 0.1 * mscale_all_dim)
                       f"{a}.rope.scaling.yarn_log_multiplier": f32(0.1 * rope.get("mscale_all_dim", 0.0))})
        elif rope["rope_type"] != "default":
            raise ConfigError(f"rope type {rope['rope_type']!r} cannot be written for llama.cpp's deepseek2")
        return hp

    def gguf_layer_tensors(self, index: int) -> list[GGUFTensor]:
        p, b = f"model.layers.{index}.", f"blk.{index}."
        a = p + "self_attn."
        h, heads, lora = self.hidden_size, self.num_heads, self.kv_lora_rank
        nope, rope, v_dim = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        t = [gguf_tensor(b + "attn_norm.weight", p + "input_layernorm.weight", (h,)),
             gguf_tensor(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (h,)),
             gguf_tensor(b + "attn_kv_a_norm.weight", a + "kv_a_layernorm.weight", (lora,)),
             gguf_tensor(b + "attn_kv_a_mqa.weight", a + "kv_a_proj_with_mqa.weight", (lora + rope, h)),
             gguf_tensor(b + "attn_output.weight", a + "o_proj.weight", (h, heads * v_dim))]
        if self.q_lora_rank:
            t += [gguf_tensor(b + "attn_q_a_norm.weight", a + "q_a_layernorm.weight", (self.q_lora_rank,)),
                  gguf_tensor(b + "attn_q_a.weight", a + "q_a_proj.weight", (self.q_lora_rank, h)),
                  gguf_tensor(b + "attn_q_b.weight", a + "q_b_proj.weight",
                              (heads * self.qk_head_dim, self.q_lora_rank))]
        else:
            t.append(gguf_tensor(b + "attn_q.weight", a + "q_proj.weight", (heads * self.qk_head_dim, h)))

        # kv_b_proj [heads * (nope + v), lora], per head k_nope rows then v rows: split into per-head k_b
        # (transposed, [heads, lora, nope]) and v_b ([heads, v, lora]), one piece per head.
        def kv_b_pieces(part: str):
            def pieces(weights):
                kv_b = weights(a + "kv_b_proj.weight").view(heads, nope + v_dim, lora)
                for head in kv_b:
                    yield head[:nope].T.contiguous() if part == "k" else head[nope:]
            return pieces

        t += [GGUFTensor(b + "attn_k_b.weight", (heads, lora, nope), kv_b_pieces("k")),
              GGUFTensor(b + "attn_v_b.weight", (heads, v_dim, lora), kv_b_pieces("v"))]  # see weights_from_gguf

        if not self.is_moe_layer(index):
            inter = self.intermediate_size
            return t + [gguf_tensor(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (inter, h)),
                        gguf_tensor(b + "ffn_up.weight", p + "mlp.up_proj.weight", (inter, h)),
                        gguf_tensor(b + "ffn_down.weight", p + "mlp.down_proj.weight", (h, inter))]
        n_exp, inter = self.n_routed_experts, self.moe_intermediate_size
        t += [gguf_tensor(b + "ffn_gate_inp.weight", p + "mlp.gate.weight", (n_exp, h)),
              gguf_tensor(b + "exp_probs_b.bias", p + "mlp.gate.e_score_correction_bias", (n_exp,))]
        if self.fused_experts:
            gate_up, down = p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"
            t += [_fused_expert_tensor(b + "ffn_gate_exps.weight", gate_up, (n_exp, inter, h), 0),
                  _fused_expert_tensor(b + "ffn_up_exps.weight", gate_up, (n_exp, inter, h), 1),
                  _fused_expert_tensor(b + "ffn_down_exps.weight", down, (n_exp, h, inter))]
        else:
            for proj, shape in (("gate", (n_exp, inter, h)), ("up", (n_exp, inter, h)), ("down", (n_exp, h, inter))):
                sources = [f"{p}mlp.experts.{e}.{proj}_proj.weight" for e in range(n_exp)]
                t.append(gguf_stacked(f"{b}ffn_{proj}_exps.weight", sources, shape))
        if self.n_shared_experts:
            shared, q = inter * self.n_shared_experts, p + "mlp.shared_experts."
            t += [gguf_tensor(b + "ffn_gate_shexp.weight", q + "gate_proj.weight", (shared, h)),
                  gguf_tensor(b + "ffn_up_shexp.weight", q + "up_proj.weight", (shared, h)),
                  gguf_tensor(b + "ffn_down_shexp.weight", q + "down_proj.weight", (h, shared))]
        return t

    def weights_from_gguf(self, read):
        plain = super().weights_from_gguf(read)
        lora = self.kv_lora_rank

        def weights(name: str) -> torch.Tensor:
            if not name.endswith("self_attn.kv_b_proj.weight"):
                return plain(name)
            b = "blk." + name.split(".")[2] + "."
            k_b, v_b = read(b + "attn_k_b.weight"), read(b + "attn_v_b.weight")  # [H, lora, nope], [H, v, lora]
            return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, lora)

        return weights

    # ---- forward ----------------------------------------------------------------------------------------
    def layer_forward(self, index: int, weights: Weights, hidden: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{index}."
        x = rms_norm(hidden, weights(p + "input_layernorm.weight"), self.rms_norm_eps)
        hidden = hidden + self._attention(p, weights, x, positions)
        x = rms_norm(hidden, weights(p + "post_attention_layernorm.weight"), self.rms_norm_eps)
        if self.is_moe_layer(index):
            return hidden + self._moe(index, weights, x)
        return hidden + self._ffn(f"blk.{index}.ffn_{{}}.weight", x, weights(p + "mlp.gate_proj.weight"),
                                  weights(p + "mlp.up_proj.weight"), weights(p + "mlp.down_proj.weight"))

    def _ffn(self, gguf_name: str, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
             matrix: int = 0, matrices: int = 1) -> torch.Tensor:
        """SwiGLU; reports its inputs (gguf_name has a {} for gate/up/down) when observed."""
        if self.observe is None:
            return swiglu(x, gate, up, down)
        per_expert = matrices > 1
        for part in ("gate", "up"):
            self._observe(gguf_name.format(part), x, matrix, matrices, per_expert)
        gated = F.silu(x @ gate.T) * (x @ up.T)
        self._observe(gguf_name.format("down"), gated, matrix, matrices, per_expert)
        return gated @ down.T

    def _attention(self, p: str, weights: Weights, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        a = p + "self_attn."
        blk = "blk." + p.split(".")[2] + "."
        if self.q_lora_rank:
            self._observe(blk + "attn_q_a.weight", x)
            q_latent = rms_norm(x @ weights(a + "q_a_proj.weight").T, weights(a + "q_a_layernorm.weight"),
                                self.rms_norm_eps)
            self._observe(blk + "attn_q_b.weight", q_latent)
            q = q_latent @ weights(a + "q_b_proj.weight").T
        else:
            self._observe(blk + "attn_q.weight", x)
            q = x @ weights(a + "q_proj.weight").T
        q = q.view(b, t, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rot = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        self._observe(blk + "attn_kv_a_mqa.weight", x)
        compressed = x @ weights(a + "kv_a_proj_with_mqa.weight").T
        kv_latent, k_rot = compressed.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv_latent = rms_norm(kv_latent, weights(a + "kv_a_layernorm.weight"), self.rms_norm_eps)
        k_rot = k_rot.view(b, 1, t, self.qk_rope_head_dim)

        cos, sin = self.rope.cos_sin(positions)
        rotate = Rope.apply_interleaved if self.rope_interleave else Rope.apply
        q_rot, k_rot = rotate(q_rot, cos, sin), rotate(k_rot, cos, sin)

        kv = (kv_latent @ weights(a + "kv_b_proj.weight").T).view(b, t, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, self.num_heads, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_rot), dim=-1)
        attn = causal_attention(q, k, v, self.softmax_scale)
        if self.observe is not None:
            self._observe_mla(blk, q, k, q_nope, kv_latent)
            self._observe(blk + "attn_output.weight", attn)
        return attn @ weights(a + "o_proj.weight").T

    def _observe_mla(self, blk: str, q: torch.Tensor, k: torch.Tensor, q_nope: torch.Tensor,
                     kv_latent: torch.Tensor) -> None:
        """llama.cpp runs MLA absorbed: per head, q_nope goes through attn_k_b and the attention-weighted
        latent through attn_v_b; those are the inputs its imatrix records for the two 3-D weights."""
        heads, t = q.shape[1], q.shape[2]
        scores = (q @ k.transpose(-1, -2)) * self.softmax_scale
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        latent_out = probs @ kv_latent[:, None]  # [b, heads, t, lora]
        for h in range(heads):
            self._observe(blk + "attn_k_b.weight", q_nope[:, h], h, heads)
            self._observe(blk + "attn_v_b.weight", latent_out[:, h], h, heads)

    def route(self, router_weight: torch.Tensor, correction_bias: torch.Tensor,
              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert indices [tokens, k] and their weights [tokens, k] for tokens x [tokens, hidden]."""
        scores = (x.float() @ router_weight.float().T).sigmoid()
        choice = scores + correction_bias
        if self.n_group > 1:
            tokens = x.shape[0]
            grouped = choice.view(tokens, self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1, sorted=False)[1], True)
            choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(tokens, -1)
        indices = choice.topk(self.experts_per_token, dim=-1, sorted=False)[1]
        gates = scores.gather(1, indices)
        if self.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, gates * self.routed_scaling_factor

    def _moe(self, index: int, weights: Weights, x: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{index}."
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        blk = f"blk.{index}."
        self._observe(blk + "ffn_gate_inp.weight", tokens)
        indices, gates = self.route(weights(p + "mlp.gate.weight"), weights(p + "mlp.gate.e_score_correction_bias"),
                                    tokens)
        if self.on_route is not None:
            self.on_route(index, indices)
        out = torch.zeros_like(tokens)
        fused = ((weights(p + "mlp.experts.gate_up_proj"), weights(p + "mlp.experts.down_proj"))
                 if self.fused_experts else None)
        for e in indices.unique().tolist():
            token_idx, slot = torch.where(indices == e)
            xe = tokens[token_idx]
            if fused:
                gate, up = fused[0][e].chunk(2, dim=0)
                down = fused[1][e]
            else:
                q = f"{p}mlp.experts.{e}."
                gate, up, down = weights(q + "gate_proj.weight"), weights(q + "up_proj.weight"), weights(
                    q + "down_proj.weight")
            ye = self._ffn(blk + "ffn_{}_exps.weight", xe, gate, up, down, e, self.n_routed_experts)
            out.index_add_(0, token_idx, ye * gates[token_idx, slot, None])
        if self.n_shared_experts:
            q = p + "mlp.shared_experts."
            out = out + self._ffn(blk + "ffn_{}_shexp.weight", tokens, weights(q + "gate_proj.weight"),
                                  weights(q + "up_proj.weight"), weights(q + "down_proj.weight"))
        return out.view(shape)


def _fused_expert_tensor(name: str, source: str, shape: tuple[int, ...], half: int | None = None) -> GGUFTensor:
    """A stacked expert tensor from transformers' fused layout ([E, 2I, H] gate_up, or [E, H, I] down)."""

    def pieces(weights):
        fused = weights(source)
        for expert in fused:
            yield expert if half is None else expert.chunk(2, dim=0)[half]

    return GGUFTensor(name, shape, pieces)
