"""Tiny Hugging Face model folders with random weights, for tests and benchmarks.

Each folder is complete: config.json, generation_config.json, a locally trained tokenizer (byte-level BPE or
SentencePiece BPE), and weights
sharded into several safetensors files with model.safetensors.index.json; in BF16, or for deepseek_v3 also
in DeepSeek's FP8 layout (F8_E4M3 weights with 128x128 `weight_scale_inv` blocks, MTP layer included).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.arch import load_architecture
from quantkit.arch.deepseek_v3 import DeepseekV3Architecture
from quantkit.testing.spm_tokenizer import save_spm_tokenizer, train_spm
from quantkit.testing.tokenizer import BOS, EOS, PAD, save_tokenizer, train_bpe

FP8_BLOCK = (128, 128)
FP8_MAX = 448.0  # largest finite float8_e4m3fn

_COMMON = {"vocab_size": 512, "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "initializer_range": 0.02,
           "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "use_cache": True}

PRESETS: dict[str, dict] = {
    "llama": {**_COMMON, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
              "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
    "qwen2": {**_COMMON, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128,
              "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rope_theta": 1000000.0, "tie_word_embeddings": False, "use_sliding_window": False},
    "deepseek_v3": {**_COMMON, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                    "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
                    "num_hidden_layers": 3, "num_nextn_predict_layers": 1, "num_attention_heads": 2,
                    "num_key_value_heads": 2, "q_lora_rank": 128, "kv_lora_rank": 128, "qk_nope_head_dim": 64,
                    "qk_rope_head_dim": 64, "v_head_dim": 64, "n_routed_experts": 8, "n_shared_experts": 1,
                    "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
                    "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                    "first_k_dense_replace": 1, "moe_layer_freq": 1, "rope_theta": 10000.0,
                    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                    "attention_bias": False, "tie_word_embeddings": False},
}
PRESETS["llama-rope3"] = {**PRESETS["llama"], "rope_theta": 500000.0,
                          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
PRESETS["qwen2-tied"] = {**PRESETS["qwen2"], "tie_word_embeddings": True}
# Every FP8 block ragged on at least one side: dimensions that are not multiples of 128.
PRESETS["deepseek_v3-ragged"] = {**PRESETS["deepseek_v3"], "hidden_size": 200, "intermediate_size": 328,
                                 "moe_intermediate_size": 72, "q_lora_rank": 96, "kv_lora_rank": 80,
                                 "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 40}


TOKENIZERS = ("bpe", "spm", "spm-json", "spm-model")


def make_tiny_model(folder: str | Path, preset: str = "llama", *, fp8: bool = False, fused_experts: bool = False,
                    mtp: bool = True, shards: int = 2, seed: int = 0, config_overrides: dict | None = None,
                    tokenizer: str = "bpe") -> Path:
    """Write a complete tiny HF model folder and return its path.

    fp8: DeepSeek FP8 layout (deepseek_v3 only). fused_experts: routed experts as transformers >= 5 saves them.
    mtp: include the multi-token-prediction layer that DeepSeek ships past num_hidden_layers.
    tokenizer: "bpe" (byte-level, Qwen2-style) or a SentencePiece BPE tokenizer saved as tokenizer.model and
    tokenizer.json ("spm"), tokenizer.json only ("spm-json") or tokenizer.model only ("spm-model").
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(PRESETS[preset])
    if tokenizer != "bpe":  # SentencePiece's fixed ids; Llama 2 has no pad token
        config.update(bos_token_id=1, eos_token_id=2)
        config.pop("pad_token_id")
    config.update(config_overrides or {})
    is_deepseek = config["model_type"] == "deepseek_v3"
    if fp8 and not is_deepseek:
        raise ValueError("the FP8 layout is DeepSeek's; use a deepseek_v3 preset")
    if not (is_deepseek and mtp):
        config.pop("num_nextn_predict_layers", None)
    if fp8:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": list(FP8_BLOCK)}
    config["torch_dtype"] = "bfloat16"

    generator = torch.Generator().manual_seed(seed)
    tensors, linear_names = _random_tensors(config, generator, fused_experts, mtp and is_deepseek)
    if fp8:
        tensors = _to_block_fp8(tensors, linear_names)
    write_sharded(folder, tensors, shards)

    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer == "bpe":
        save_tokenizer(_tokenizer(config["vocab_size"]), folder, config["max_position_embeddings"])
    else:
        save_spm_tokenizer(_spm_model(config["vocab_size"]), folder, config["max_position_embeddings"],
                           tokenizer_model=tokenizer != "spm-json", tokenizer_json=tokenizer != "spm-model")
    return folder


def _random_tensors(config: dict, gen: torch.Generator, fused_experts: bool,
                    mtp: bool) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Random tensors by name, and the names of the 2-D linear weights among them."""
    arch = load_architecture(config, ["model.layers.0.mlp.experts.gate_up_proj"] if fused_experts else [])
    shapes = arch.tensor_shapes()
    linear_names = {lin.name for layer in arch.layers() for lin in layer.linears if len(lin.shape) == 2}
    if mtp:
        mtp_shapes, mtp_linears = _mtp_shapes(arch)
        shapes.update(mtp_shapes)
        linear_names |= mtp_linears
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("e_score_correction_bias"):
            t = torch.randn(shape, generator=gen) * 0.05  # the bias is kept in float32, as DeepSeek ships it
        elif name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif "embed_tokens" in name:
            t = torch.randn(shape, generator=gen)
        else:  # linear weights, 2-D or stacked 3-D experts: fan-in scaled so activations stay O(1)
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        tensors[name] = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
    return tensors, linear_names


def _mtp_shapes(arch: DeepseekV3Architecture) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """DeepSeek's MTP module at layer index num_hidden_layers: a full MoE decoder layer plus its projections.
    Returns its shapes and its 2-D linear weight names."""
    n, h = arch.num_layers, arch.hidden_size
    layer = arch.layer_spec(arch.num_layers - 1)  # same shapes as the last (MoE) layer

    def renamed(name: str) -> str:
        return name.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.", 1)

    shapes = {renamed(name): shape for name, shape in layer.tensor_shapes().items()}
    p = f"model.layers.{n}."
    shapes.update({p + "enorm.weight": (h,), p + "hnorm.weight": (h,), p + "eh_proj.weight": (h, 2 * h),
                   p + "shared_head.norm.weight": (h,), p + "shared_head.head.weight": (arch.vocab_size, h),
                   p + "embed_tokens.weight": (arch.vocab_size, h)})
    linears = {renamed(lin.name) for lin in layer.linears if len(lin.shape) == 2} | {p + "eh_proj.weight"}
    return shapes, linears


def _to_block_fp8(tensors: dict[str, torch.Tensor], linear_names: set[str]) -> dict[str, torch.Tensor]:
    """DeepSeek stores every Linear of the decoder layers (incl. MTP) in FP8; not embeddings, head, norms, router."""
    out = {}
    for name, t in tensors.items():
        if name not in linear_names:
            out[name] = t
            continue
        q, scale = quantize_block_fp8(t.float())
        out[name] = q
        out[name + "_scale_inv"] = scale
    return out


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block quantization: per-block scale = amax / 448 over the zero-padded block."""
    rows, cols = weight.shape
    br, bc = block
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(nr * br, nc * bc, dtype=torch.float32)
    padded[:rows, :cols] = weight
    blocks = padded.view(nr, br, nc, bc)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).view(nr * br, nc * bc)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """Split by cumulative bytes into `shards` files; a block scale goes to the shard after its weight's,
    as a reader must resolve every tensor through the index, never assume co-location."""
    names = [n for n in tensors if not n.endswith("_scale_inv")]
    total = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map, running = {}, 0
    for name in names:
        index = min(shards - 1, running * shards // max(total, 1))
        weight_map[name] = files[index]
        running += tensors[name].numel() * tensors[name].element_size()
        if name + "_scale_inv" in tensors:
            weight_map[name + "_scale_inv"] = files[(index + 1) % shards]
    for file in files:
        part = {n: tensors[n].contiguous() for n, f in weight_map.items() if f == file}
        save_file(part, str(folder / file), metadata={"format": "pt"})
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _tokenizer_texts() -> list[str]:
    return [Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")
            for module in ("argparse", "textwrap", "json.decoder", "string", "difflib")]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    return train_bpe(_tokenizer_texts(), vocab_size).to_str()


@functools.lru_cache(maxsize=4)
def _spm_model(vocab_size: int) -> bytes:
    return train_spm(_tokenizer_texts(), vocab_size)


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json(vocab_size))


__all__ = ["PRESETS", "make_tiny_model", "quantize_block_fp8", "BOS", "EOS", "PAD"]
