"""llama.cpp's per-tensor type selection ("mixtures") for its file types, as plain data logic.

Given a model's GGUF tensor names and shapes, a few model facts and a llama-quantize file type (Q4_K_M, ...),
`plan_types` returns a plan (quantkit.plan.Plan, format "gguf", target the file type) of the ggml type
llama-quantize would give every tensor, with bytes per tensor; `file_type(name).ftype` is the LLAMA_FTYPE
value for `general.file_type`.

Version followed: the llama.cpp vendored in llama-cpp-python 0.3.36, `src/llama-quant.cpp`. That file is the
refactored quantizer FORMATS.md §3 calls [lc-quant-new] (`tensor_category`, `tensor_type_fallback`,
`llama_tensor_get_type_impl`, `tensor_requires_imatrix`), so its semantics are the ones implemented here:

- `--tensor-type` overrides: the FIRST pattern that matches the tensor name wins (even when it names the type
  the tensor already has), and the mixture rules are then skipped for that tensor (so it does not advance
  the attn_v / ffn counters). Overrides also apply under `--pure`, which only switches the mixture rules off.
- The row-size fallback (`tensor_type_fallback`) runs after the override / mixture choice, on its result:
  256-block I-quants -> IQ4_NL; Q2_K, Q3_K, TQ1_0, TQ2_0 -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0;
  a type whose block is already <= 32 stays; if the row length is still not a multiple -> F16.
- `--token-embedding-type` / `--output-tensor-type` are returned as given for token_embd.weight /
  output.weight before anything else (no fallback). For a model with tied embeddings (no output.weight)
  token_embd.weight takes the output rule inside the mixture, where `--output-tensor-type` applies.
- attn_v, attn_qkv and attn_kv_b are all "attn_v-like" (category_is_attn_v) for the attn_v rules.
- Mixture rules run only when the file type's default type is a quantized type (not for F32/F16/BF16).

- The IQ1 / IQ2 file types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M) have their own branch of rules, taken
  before the attn_v / ffn_down / attn_output rules of the others; their ffn_down rule counts ffn_down tensors
  (never the layer parsed from the name, even for MoE models).
- Without an imatrix, llama-quantize refuses a file in which any tensor but token_embd / output would be
  IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S or IQ1_M after the fallback (tensor_requires_imatrix), naming the first
  such tensor in quantize_order; plan_types raises ConfigError there. That refuses every IQ1 / IQ2 file type,
  IQ3_XXS (attn_q / attn_k are IQ2_S) and IQ3_XS (attn_q / attn_k are IQ3_XXS), not IQ3_S and IQ3_M.

Only the file types listed in `file_types()` are accepted; llama.cpp's rules for the others (Q2_K_S, TQ*,
Q1_0, Q2_0, MXFP4_MOE) are not reproduced. Rules for falcon and for 8-expert (Mixtral-style) models are kept
because they depend only on model facts.

Tensors llama.cpp does not quantize (norms, biases, 1-D tensors, ffn_gate_inp, exp_probs_b.bias, rope_freqs,
...) are copied unchanged by llama-quantize; here they are planned as F32, the type quantkit's source tensors
are written in. Regex patterns are lower-cased as llama-quantize's command line does and matched with Python's
`re.search` (llama.cpp uses std::regex ECMAScript with regex_search; simple patterns behave the same).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.errors import ConfigError
from quantkit.plan.plan import Plan, PlanEntry

# ---------------------------------------------------------------------------------------------------------------
# file types


@dataclass(frozen=True)
class FileType:
    name: str  # llama-quantize's name, e.g. "Q4_K_M"
    ftype: int  # LLAMA_FTYPE value (include/llama.h), written to general.file_type
    default_type: str  # ggml type name (llama_ftype_get_default_type)


# llama-quantize's names (tools/quantize/quantize.cpp QUANT_OPTIONS) -> LLAMA_FTYPE (llama.h) and the default
# tensor type (llama-quant.cpp llama_ftype_get_default_type). Only the file types quantkit supports; the IQ2 /
# IQ1 tensor types are encoded by codecs of their own (a plan names them whether or not they are built).
_FILE_TYPES: tuple[FileType, ...] = (
    FileType("F32", 0, "F32"),
    FileType("F16", 1, "F16"),
    FileType("BF16", 32, "BF16"),
    FileType("Q8_0", 7, "Q8_0"),
    FileType("Q4_0", 2, "Q4_0"),
    FileType("Q4_1", 3, "Q4_1"),
    FileType("Q5_0", 8, "Q5_0"),
    FileType("Q5_1", 9, "Q5_1"),
    FileType("Q2_K", 10, "Q2_K"),
    FileType("Q3_K_S", 11, "Q3_K"),
    FileType("Q3_K_M", 12, "Q3_K"),
    FileType("Q3_K_L", 13, "Q3_K"),
    FileType("Q4_K_S", 14, "Q4_K"),
    FileType("Q4_K_M", 15, "Q4_K"),
    FileType("Q5_K_S", 16, "Q5_K"),
    FileType("Q5_K_M", 17, "Q5_K"),
    FileType("Q6_K", 18, "Q6_K"),
    FileType("IQ4_NL", 25, "IQ4_NL"),
    FileType("IQ4_XS", 30, "IQ4_XS"),
    FileType("IQ3_M", 27, "IQ3_S"),
    FileType("IQ3_S", 26, "IQ3_S"),
    FileType("IQ3_XS", 22, "IQ3_S"),
    FileType("IQ3_XXS", 23, "IQ3_XXS"),
    FileType("IQ2_M", 29, "IQ2_S"),
    FileType("IQ2_S", 28, "IQ2_XS"),
    FileType("IQ2_XS", 20, "IQ2_XS"),
    FileType("IQ2_XXS", 19, "IQ2_XXS"),
    FileType("IQ1_M", 31, "IQ1_M"),
    FileType("IQ1_S", 24, "IQ1_S"),
)
FILE_TYPES: dict[str, FileType] = {ft.name: ft for ft in _FILE_TYPES}
FILE_TYPE_ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# types whose ggml_is_quantized() is false: no mixture rules run when the default type is one of these
_NOT_QUANTIZED = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}
# target types that llama.cpp refuses without an imatrix (tensor_requires_imatrix; Q2_K only in Q2_K_S files)
_NEED_IMATRIX = {"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"}
# file types whose rules are llama_tensor_get_type_impl's IQ1 / IQ2 branch
_IQ1_IQ2 = {"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}


def file_types() -> list[str]:
    """The accepted file type names (canonical; the aliases Q3_K, Q4_K, Q5_K are accepted too)."""
    return list(FILE_TYPES)


def file_type(name: str) -> FileType:
    """Look a file type up by llama-quantize name, case-insensitively; raise ConfigError for unknown names."""
    key = name.strip().upper()
    key = FILE_TYPE_ALIASES.get(key, key)
    if key not in FILE_TYPES:
        valid = ", ".join([*FILE_TYPES, *(f"{a} (= {c})" for a, c in FILE_TYPE_ALIASES.items())])
        raise ConfigError(f"unknown file type {name!r}; valid file types: {valid}")
    return FILE_TYPES[key]


def file_type_name(ftype: int | None) -> str | None:
    """llama-quantize's name of a general.file_type value (LLAMA_FTYPE); None for one quantkit does not know."""
    return next((ft.name for ft in _FILE_TYPES if ft.ftype == ftype), None)


def ggml_type(name: str) -> str:
    """Normalise a ggml type name ("q4_K", "bf16", ...) as llama-quantize matches it (case-insensitively)."""
    key = name.strip().upper()
    if key not in GGMLQuantizationType.__members__:
        valid = ", ".join(t.name for t in GGMLQuantizationType)
        raise ConfigError(f"unknown ggml type {name!r}; valid types: {valid}")
    return key


def is_ggml_type(name: str) -> bool:
    return name.strip().upper() in GGMLQuantizationType.__members__


def parse_tensor_type(spec: str) -> tuple[str, str]:
    """`--tensor-type PATTERN=TYPE` -> (lower-cased pattern, ggml type name), as quantize.cpp parse_tensor_type."""
    pattern, sep, type_name = spec.partition("=")
    if not sep or not pattern:
        raise ConfigError(f"malformed tensor type {spec!r}: expected PATTERN=TYPE, e.g. 'attn_v=q8_0'")
    if not type_name:
        raise ConfigError(f"tensor type {spec!r} lacks the type after '='")
    pattern = pattern.lower()
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"tensor type pattern {pattern!r} is not a valid regular expression: {e}") from None
    return pattern, ggml_type(type_name)


# ---------------------------------------------------------------------------------------------------------------
# sizes and order


def block_size(type_name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]


def tensor_nbytes(type_name: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of this torch-order shape in this ggml type (rows x ggml_row_size)."""
    blck, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    ne0 = shape[-1] if shape else 1
    if ne0 % blck:
        raise ConfigError(f"row length {ne0} is not a multiple of {type_name}'s block size {blck}")
    return math.prod(shape[:-1]) * (ne0 // blck) * size


_LAYER_RE = re.compile(r"blk\.([+-]?\d+)\.")


def _layer_of(name: str) -> int | None:
    """sscanf(name, "blk.%d.", &il): the layer number of a block tensor, None for others."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def quantize_order(names: Iterable[str]) -> list[str]:
    """The order llama-quantize visits (and writes) tensors: llama_model_loader's weight_name_comparer, i.e.
    non-block tensors first (layer -1), then by layer number, byte order of the name within a layer."""

    def key(name: str) -> tuple[int, bytes]:
        il = _layer_of(name)
        return (-1 if il is None else il, name.encode())

    return sorted(names, key=key)


# ---------------------------------------------------------------------------------------------------------------
# model facts and plan


@dataclass(frozen=True)
class ModelFacts:
    """What the mixture rules need to know about the model (GGUF metadata values)."""

    arch: str  # general.architecture: "llama", "qwen2", "deepseek2", ...
    n_layer: int  # {arch}.block_count
    n_head: int  # {arch}.attention.head_count
    n_head_kv: int  # {arch}.attention.head_count_kv (deepseek2: 1, MLA written as MQA)
    n_expert: int = 0  # {arch}.expert_count (0 for dense models)
    has_output: bool | None = None  # output.weight present (False = tied embeddings); None: read the tensor list

    @property
    def n_gqa(self) -> int:
        """llama_hparams::n_gqa (layer 0)."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """Whether llama.cpp's load_arch_hparams labels the model LLM_TYPE_70B (only that label matters here)."""
        if self.arch == "llama":  # src/models/llama.cpp: 80 layers with GQA, not an 8-expert model
            return self.n_expert != 8 and self.n_layer == 80 and self.n_head != self.n_head_kv
        return {"qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}.get(self.arch) == self.n_layer


# ---------------------------------------------------------------------------------------------------------------
# llama-quant.cpp logic

# tensor_category, decided by tensor_get_category's substring tests in this order
_OUTPUT, _TOKEN_EMBD, _ATTN_QKV, _ATTN_KV_B, _ATTN_V, _ATTN_K, _ATTN_Q, _ATTN_OUTPUT = range(8)
_FFN_UP, _FFN_GATE, _FFN_DOWN, _OTHER = range(8, 12)
_CATEGORY_SUBSTRINGS = (
    ("attn_qkv.weight", _ATTN_QKV), ("attn_kv_b.weight", _ATTN_KV_B), ("attn_v.weight", _ATTN_V),
    ("attn_k.weight", _ATTN_K), ("attn_q.weight", _ATTN_Q), ("attn_output.weight", _ATTN_OUTPUT),
    ("ffn_up", _FFN_UP), ("ffn_gate", _FFN_GATE), ("ffn_down", _FFN_DOWN),
)
_ATTN_V_LIKE = (_ATTN_V, _ATTN_QKV, _ATTN_KV_B)  # category_is_attn_v


def _category(name: str) -> int:
    if name == "output.weight":
        return _OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return _TOKEN_EMBD
    for sub, cat in _CATEGORY_SUBSTRINGS:
        if sub in name:
            return cat
    return _OTHER


# tensor_allows_quantization: names never quantized (arch-independent part; GLM5_NEXT's extra list is omitted)
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)


def _n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing ggml dims of size 1 (leading torch dims) do not count; at least 1."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return max(1, len(dims))


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """tensor_allows_quantization (without --leave-output-tensor / COPY)."""
    if _n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):  # LLM_TENSOR_POS_EMBD / TOKEN_TYPES
        return False
    return not any(s in name for s in _NEVER_QUANTIZED)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # (C's truncating % differs from Python's only for i < n/8, which the first test already accepts)
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


class _State:
    """quantize_state_impl: the counters that advance as tensors are visited in quantize_order."""

    def __init__(self, facts: ModelFacts, names: Sequence[str], imatrix: bool):
        self.facts = facts
        self.has_imatrix = imatrix
        self.n_attention_wv = sum(_category(n) in _ATTN_V_LIKE for n in names)  # init_quantize_state_counters
        self.has_tied_embeddings = "output.weight" not in names
        self.n_ffn = facts.n_layer  # n_ffn_down = n_ffn_gate = n_ffn_up = n_layer_all
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0

    def layer_info(self, counter: int, name: str) -> tuple[int, int]:
        """llama_tensor_get_type_impl's layer_info: the running counter for dense models, the layer parsed from
        the name when n_expert > 1 (experts need not be consecutive)."""
        if max(1, self.facts.n_expert) > 1:
            il = _layer_of(name)
            if il is None:
                raise ConfigError(f"failed to determine the layer of tensor {name}")
            if not 0 <= il < self.n_ffn:
                raise ConfigError(f"bad layer {il} for tensor {name}: must be in [0, {self.n_ffn})")
            return il, self.n_ffn
        return counter, self.n_ffn


def _mixture_type(qs: _State, name: str, shape: Sequence[int], cat: int, ft: str, new_type: str,
                  output_tensor_type: str | None) -> str:
    """llama_tensor_get_type_impl for the supported file types (`ft` = file type name, `new_type` = its default)."""
    facts = qs.facts
    arch = facts.arch
    falcon = arch == "falcon"
    n_gqa = facts.n_gqa

    if cat == _OUTPUT or (qs.has_tied_embeddings and cat == _TOKEN_EMBD):
        if output_tensor_type is not None:
            return output_tensor_type
        if falcon or shape[-1] % block_size(new_type):
            return "Q8_0"
        if ft in _IQ1_IQ2 or ft == "IQ3_XXS":
            return "Q5_K"
        return "Q6_K" if new_type != "Q8_0" else new_type

    if cat == _TOKEN_EMBD:  # --token-embedding-type was handled by the caller (the TQ rules: unsupported files)
        if ft in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        if ft in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S"
        return new_type

    if ft in _IQ1_IQ2:
        return _iq1_iq2_type(qs, cat, ft, new_type)

    if cat in _ATTN_V_LIKE:  # (llama-quant.cpp's later ATTENTION_QKV branch is unreachable, so not repeated)
        if ft == "Q2_K":
            new_type = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif ft == "IQ3_XXS":
            new_type = "Q4_K" if n_gqa >= 4 else "IQ3_XXS" if qs.has_imatrix else "IQ3_S"
        elif ft in ("IQ3_XS", "IQ3_S") and n_gqa >= 4:
            new_type = "Q4_K"
        elif ft == "IQ3_M":
            new_type = "Q4_K"
        elif ft == "Q3_K_M":
            new_type = "Q5_K" if qs.i_attention_wv < 2 else "Q4_K"
        elif ft == "Q3_K_L":
            new_type = "Q5_K"
        elif ft in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
            new_type = "Q5_K"
        elif ft in ("Q4_K_M", "Q5_K_M") and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new_type = "Q6_K"
        elif ft == "Q4_K_S" and qs.i_attention_wv < 4:
            new_type = "Q5_K"
        if facts.is_70b and new_type in ("Q3_K", "Q4_K"):
            # 70B: 8 heads share attn_v, so it is 8x smaller than attn_q and more bits are cheap
            new_type = "Q5_K"
        if facts.n_expert == 8:
            new_type = "Q8_0"
        qs.i_attention_wv += 1
        return new_type

    if cat == _ATTN_K and facts.n_expert == 8:
        return "Q8_0"

    if cat in (_ATTN_K, _ATTN_Q):
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ft, new_type)

    if cat == _FFN_DOWN:
        i_layer, n_layer = qs.layer_info(qs.i_ffn_down, name)
        if ft == "Q2_K":
            new_type = "Q3_K"
        elif ft == "IQ3_XXS" and not qs.has_imatrix:
            new_type = "Q4_K" if i_layer < n_layer // 8 else "Q3_K"
        elif ft == "Q3_K_M":
            if i_layer < n_layer // 16:
                new_type = "Q5_K"
            elif not falcon or _use_more_bits(i_layer, n_layer):
                new_type = "Q4_K"
            else:
                new_type = "Q3_K"
        elif ft == "IQ3_M" and (i_layer < n_layer // 8
                                or (facts.n_expert == 8 and _use_more_bits(i_layer, n_layer))):
            new_type = "Q4_K"
        elif ft == "Q3_K_L":
            new_type = "Q4_K" if falcon else "Q5_K"
        elif ft == "Q4_K_M":
            if falcon:
                new_type = ("Q6_K" if i_layer < n_layer // 16
                            else "Q5_K" if _use_more_bits(i_layer, n_layer) else "Q4_K")
            elif _use_more_bits(i_layer, n_layer):
                new_type = "Q6_K"
        elif i_layer < n_layer // 8 and ft in ("IQ4_NL", "IQ4_XS") and not qs.has_imatrix:
            new_type = "Q5_K"
        elif ft == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
            new_type = "Q6_K"
        elif ft == "Q4_K_S" and not falcon and i_layer < n_layer // 8:
            new_type = "Q5_K"
        elif ft in ("Q4_0", "Q5_0") and qs.has_imatrix and i_layer < n_layer // 8:
            # guard the first ffn_down layers, only with an imatrix (Q4_1/Q5_1 misbehave there without one)
            new_type = "Q4_1" if ft == "Q4_0" else "Q5_1"
        qs.i_ffn_down += 1
        return new_type

    if cat == _ATTN_OUTPUT:
        if not falcon:
            if facts.n_expert == 8:
                if ft in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                          "IQ3_M", "IQ4_XS"):
                    new_type = "Q5_K"
            else:
                new_type = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K",
                            "IQ3_M": "Q4_K"}.get(ft, new_type)
        elif ft == "Q3_K_L":
            new_type = "Q4_K"
        return new_type

    if cat in (_FFN_GATE, _FFN_UP):
        if cat == _FFN_GATE:
            i_layer, n_layer = qs.layer_info(qs.i_ffn_gate, name)
            qs.i_ffn_gate += 1
        else:
            i_layer, n_layer = qs.layer_info(qs.i_ffn_up, name)
            qs.i_ffn_up += 1
        if ft == "IQ3_XS" and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            new_type = "IQ3_XXS"
        return new_type

    return new_type


def _iq1_iq2_type(qs: _State, cat: int, ft: str, new_type: str) -> str:
    """llama_tensor_get_type_impl's branch for the IQ1 / IQ2 file types (after the output and token_embd rules).
    Its ffn_down rule takes the first n_layer / 8 ffn_down tensors in quantize_order, not layers."""
    facts = qs.facts
    iq2_s = ft in ("IQ2_S", "IQ2_M")
    if cat in _ATTN_V_LIKE:
        qs.i_attention_wv += 1
        if facts.n_gqa >= 4 or facts.n_expert >= 4:
            return "Q4_K"
        return "IQ3_S" if iq2_s else "Q2_K"
    if cat == _ATTN_K and facts.n_expert == 8:
        return "Q4_K"
    if cat == _FFN_DOWN:
        first = qs.i_ffn_down < qs.n_ffn // 8
        qs.i_ffn_down += 1
        if first:
            return "IQ3_S" if iq2_s else "Q2_K"
        return new_type
    if cat == _ATTN_OUTPUT:
        if facts.n_expert == 8:
            return "Q5_K"
        if ft in ("IQ1_S", "IQ1_M"):
            return "IQ2_XXS"
        if iq2_s:
            return "IQ3_S"
    return new_type


_FALLBACK = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}


def row_fallback(name: str, ne0: int, target: str) -> str:
    """tensor_type_fallback: a type whose block does not divide the row length is replaced."""
    blck = block_size(target)
    if ne0 % blck == 0:
        return target
    if target in _FALLBACK:
        out = _FALLBACK[target]
    elif blck <= 32:
        out = target  # already a 32-block type: only F16 is left
    else:
        raise ConfigError(f"{name}: row length {ne0} does not fit {target} and llama.cpp defines no fallback")
    return out if ne0 % block_size(out) == 0 else "F16"


def requires_imatrix(name: str, type_name: str) -> bool:
    """tensor_requires_imatrix: whether llama-quantize refuses to write this tensor in this type without
    importance data (token_embd / per_layer_token_embd / output never)."""
    return type_name in _NEED_IMATRIX and _category(name) not in (_OUTPUT, _TOKEN_EMBD)


def _as_items(tensors: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]]):
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in items:
        if name in out:
            raise ConfigError(f"tensor {name} is listed twice")
        out[name] = tuple(int(d) for d in shape)
    return out


def plan_types(
    tensors: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]],
    facts: ModelFacts,
    file_type_name: str,
    *,
    imatrix: bool = False,
    tensor_types: Sequence[str | tuple[str, str]] = (),
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    pure: bool = False,
) -> Plan:
    """The ggml type llama-quantize gives every tensor (llama_tensor_get_type, visited in quantize_order).

    tensors: GGUF name -> torch-order shape. tensor_types: `--tensor-type` specs, "REGEX=TYPE" strings or
    (pattern, type) pairs, in command-line order. output_tensor_type / token_embedding_type: ggml type names.
    imatrix: whether an importance matrix is passed (some rules depend on it). pure: `--pure`."""
    ft = file_type(file_type_name)
    shapes = _as_items(tensors)
    names = quantize_order(shapes)
    if facts.has_output is not None and facts.has_output != ("output.weight" in shapes):
        raise ConfigError(f"model facts say has_output={facts.has_output} but output.weight is "
                          f"{'present' if 'output.weight' in shapes else 'absent'} in the tensor list")
    patterns = []
    for spec in tensor_types:
        pattern, type_name = parse_tensor_type(spec) if isinstance(spec, str) else (spec[0], ggml_type(spec[1]))
        note = f"--tensor-type {spec if isinstance(spec, str) else pattern}"
        patterns.append((re.compile(pattern), type_name, note))
    out_type = None if output_tensor_type is None else ggml_type(output_tensor_type)
    embd_type = None if token_embedding_type is None else ggml_type(token_embedding_type)

    qs = _State(facts, names, imatrix)
    default = ft.default_type
    entries = []
    for name in names:
        shape = shapes[name]
        cat = _category(name)
        note = ""
        if not allows_quantization(name, shape):
            entries.append(PlanEntry(name, shape, "F32", tensor_nbytes("F32", shape), False))
            continue
        new_type = default
        matched = None
        if embd_type is not None and cat == _TOKEN_EMBD and not (
            name == "per_layer_token_embd.weight" and any(p.search(name) for p, _, _ in patterns)
        ):
            new_type, note = embd_type, "--token-embedding-type"
        elif out_type is not None and cat == _OUTPUT:
            new_type, note = out_type, "--output-tensor-type"
        elif default not in _NOT_QUANTIZED:
            matched = next(((t, n) for p, t, n in patterns if p.search(name)), None)
            if matched is not None:
                new_type, note = matched
            elif not pure:
                new_type = _mixture_type(qs, name, shape, cat, ft.name, default, out_type)
            chosen = new_type
            new_type = row_fallback(name, shape[-1], chosen)
            if new_type != chosen:
                note = (note + ", " if note else "") + f"fallback from {chosen}"
        if not imatrix and requires_imatrix(name, new_type):
            raise ConfigError(f"{ft.name}: {name} would be {new_type}, which llama-quantize refuses to write without "
                              "an importance matrix; pass one with --imatrix (e.g. from `quantkit imatrix`)")
        entries.append(PlanEntry(name, shape, new_type, tensor_nbytes(new_type, shape), True, note))
    return Plan("gguf", ft.name, tuple(entries))
