"""llama.cpp mixtures: unit tests of the rules, and (interop) the same plans checked tensor by tensor against
llama.cpp's own quantizer (llama_model_quantize with --dry-run; its refusals for real) on tiny synthetic GGUF models."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch

from quantkit.errors import ConfigError, QuantkitError
from quantkit.formats.gguf.format import FORMAT as GGUF
from quantkit.formats.gguf.mixtures import (
    ModelFacts,
    file_type,
    file_types,
    plan_types,
    quantize_order,
    tensor_nbytes,
)
from quantkit.formats.gguf.writer import GGUFOutput, check_importance
from quantkit.testing.ggml_reference import llama_quantize, llama_quantize_types

# ---------------------------------------------------------------------------------------------------------------
# synthetic models: GGUF name -> torch-order shape (the shapes llama.cpp's loader expects)


def llama_like(n_layer=8, n_embd=256, n_head=8, n_head_kv=2, head_dim=32, n_ff=256, n_vocab=64, tied=False,
               biases=False, rope_freqs=False, n_expert=0):
    t = {"token_embd.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,)}
    if not tied:
        t["output.weight"] = (n_vocab, n_embd)
    if rope_freqs:
        t["rope_freqs.weight"] = (head_dim // 2,)
    for i in range(n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (n_embd,)
        t[p + "attn_q.weight"] = (n_head * head_dim, n_embd)
        t[p + "attn_k.weight"] = (n_head_kv * head_dim, n_embd)
        t[p + "attn_v.weight"] = (n_head_kv * head_dim, n_embd)
        t[p + "attn_output.weight"] = (n_embd, n_head * head_dim)
        if biases:
            t[p + "attn_q.bias"] = (n_head * head_dim,)
            t[p + "attn_k.bias"] = (n_head_kv * head_dim,)
            t[p + "attn_v.bias"] = (n_head_kv * head_dim,)
        t[p + "ffn_norm.weight"] = (n_embd,)
        if n_expert:  # Mixtral-style: llama arch with stacked experts
            t[p + "ffn_gate_inp.weight"] = (n_expert, n_embd)
            t[p + "ffn_gate_exps.weight"] = (n_expert, n_ff, n_embd)
            t[p + "ffn_up_exps.weight"] = (n_expert, n_ff, n_embd)
            t[p + "ffn_down_exps.weight"] = (n_expert, n_embd, n_ff)
        else:
            t[p + "ffn_gate.weight"] = (n_ff, n_embd)
            t[p + "ffn_up.weight"] = (n_ff, n_embd)
            t[p + "ffn_down.weight"] = (n_embd, n_ff)
    return t


DS = dict(n_layer=4, n_dense=1, n_embd=256, n_head=2, q_lora=256, kv_lora=256, nope=128, rope=32, v_head=128,
          n_ff=256, n_ff_exp=256, n_expert=4, n_shared=1, n_vocab=64)


def deepseek2_like(**kw):
    """DeepSeek-V3 tensor set (MLA form): attn_k_b has row length nope = 128, so 256-block types fall back."""
    c = {**DS, **kw}
    e, h = c["n_embd"], c["n_head"]
    t = {"token_embd.weight": (c["n_vocab"], e), "output_norm.weight": (e,), "output.weight": (c["n_vocab"], e)}
    for i in range(c["n_layer"]):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (e,)
        t[p + "attn_q_a_norm.weight"] = (c["q_lora"],)
        t[p + "attn_kv_a_norm.weight"] = (c["kv_lora"],)
        t[p + "attn_q_a.weight"] = (c["q_lora"], e)
        t[p + "attn_q_b.weight"] = (h * (c["nope"] + c["rope"]), c["q_lora"])
        t[p + "attn_kv_a_mqa.weight"] = (c["kv_lora"] + c["rope"], e)
        t[p + "attn_k_b.weight"] = (h, c["kv_lora"], c["nope"])
        t[p + "attn_v_b.weight"] = (h, c["v_head"], c["kv_lora"])
        t[p + "attn_output.weight"] = (e, h * c["v_head"])
        t[p + "ffn_norm.weight"] = (e,)
        if i < c["n_dense"]:
            t[p + "ffn_gate.weight"] = (c["n_ff"], e)
            t[p + "ffn_up.weight"] = (c["n_ff"], e)
            t[p + "ffn_down.weight"] = (e, c["n_ff"])
        else:
            x, f = c["n_expert"], c["n_ff_exp"]
            t[p + "ffn_gate_inp.weight"] = (x, e)
            t[p + "exp_probs_b.bias"] = (x,)
            t[p + "ffn_gate_exps.weight"] = (x, f, e)
            t[p + "ffn_up_exps.weight"] = (x, f, e)
            t[p + "ffn_down_exps.weight"] = (x, e, f)
            t[p + "ffn_gate_shexp.weight"] = (f * c["n_shared"], e)
            t[p + "ffn_up_shexp.weight"] = (f * c["n_shared"], e)
            t[p + "ffn_down_shexp.weight"] = (e, f * c["n_shared"])
    return t


def facts_for(arch, tensors, n_layer, n_head, n_head_kv, n_expert=0):
    return ModelFacts(arch, n_layer, n_head, n_head_kv, n_expert, has_output="output.weight" in tensors)


def layers_with(plan, suffix, type_name):
    return sorted(int(n.split(".")[1]) for n, t in plan.schemes.items() if n.endswith(suffix) and t == type_name)


# ---------------------------------------------------------------------------------------------------------------
# unit tests (no llama.cpp)


def test_file_types_names_aliases_and_ftype_values():
    names = file_types()
    assert names[:3] == ["F32", "F16", "BF16"] and "Q4_K_M" in names and "IQ1_M" in names and len(names) == 29
    assert file_type("q4_k").name == "Q4_K_M" and file_type("Q3_K").name == "Q3_K_M"
    assert file_type(" q5_k ").name == "Q5_K_M"
    for name in names:  # LLAMA_FTYPE values agree with gguf-py's copy of the enum
        ft = file_type(name)
        enum_name = "ALL_F32" if name == "F32" else "MOSTLY_" + name
        assert gguf.LlamaFileType[enum_name].value == ft.ftype
    with pytest.raises(ConfigError, match="valid file types: F32, F16.*Q4_K_M.*Q4_K \\(= Q4_K_M\\)"):
        file_type("Q4_K_X")
    with pytest.raises(ConfigError):
        plan_types({}, ModelFacts("llama", 1, 1, 1), "Q2_K_S")


def test_q4_k_m_32_layers_ffn_down_and_attn_v_use_more_bits():
    t = llama_like(n_layer=32)
    plan = plan_types(t, facts_for("llama", t, 32, 8, 2), "Q4_K_M")
    more = [*range(4), *range(6, 28, 3), *range(28, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert layers_with(plan, "ffn_down.weight", "Q6_K") == more
    assert layers_with(plan, "ffn_down.weight", "Q4_K") == sorted(set(range(32)) - set(more))
    assert layers_with(plan, "attn_v.weight", "Q6_K") == more  # attn_v ordinal == layer here
    assert plan.schemes["output.weight"] == "Q6_K" and plan.schemes["token_embd.weight"] == "Q4_K"
    assert {plan.schemes[f"blk.5.{n}.weight"] for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")} == {
        "Q4_K"}
    assert plan.schemes["blk.5.attn_norm.weight"] == "F32" and file_type(plan.target).ftype == 15


def test_quantize_order_and_attn_v_counter_follow_it():
    names = ["blk.10.attn_v.weight", "blk.2.ffn_up.weight", "token_embd.weight", "blk.2.attn_k.weight",
             "output.weight", "blk.1.x.weight", "output_norm.weight", "rope_freqs.weight"]
    assert quantize_order(names) == ["output.weight", "output_norm.weight", "rope_freqs.weight",
                                     "token_embd.weight", "blk.1.x.weight", "blk.2.attn_k.weight",
                                     "blk.2.ffn_up.weight", "blk.10.attn_v.weight"]
    t = llama_like(n_layer=12)
    plan = plan_types(t, facts_for("llama", t, 12, 8, 2), "Q4_K_S")
    assert layers_with(plan, "attn_v.weight", "Q5_K") == [0, 1, 2, 3]  # not 0, 1, 10, 11 (string order)
    assert [e.name for e in plan.entries][:4] == ["output.weight", "output_norm.weight", "token_embd.weight",
                                                  "blk.0.attn_k.weight"]
    plan = plan_types(t, facts_for("llama", t, 12, 8, 2), "Q3_K_M")
    assert layers_with(plan, "attn_v.weight", "Q5_K") == [0, 1]
    assert layers_with(plan, "ffn_down.weight", "Q5_K") == [] and plan.schemes["blk.0.ffn_down.weight"] == "Q4_K"
    assert plan.schemes["blk.0.attn_output.weight"] == "Q4_K" and plan.schemes["blk.0.attn_q.weight"] == "Q3_K"


def test_output_and_tied_embedding_rule():
    t = llama_like()
    f = facts_for("llama", t, 8, 8, 2)
    for ft, out, emb in [("Q4_0", "Q6_K", "Q4_0"), ("Q8_0", "Q8_0", "Q8_0"), ("Q2_K", "Q6_K", "Q2_K"),
                         ("IQ4_NL", "Q6_K", "IQ4_NL"), ("F16", "F16", "F16"), ("BF16", "BF16", "BF16")]:
        plan = plan_types(t, f, ft)
        assert (plan.schemes["output.weight"], plan.schemes["token_embd.weight"]) == (out, emb), ft
    tied = llama_like(tied=True)
    plan = plan_types(tied, facts_for("qwen2", tied, 8, 8, 2), "Q4_K_M")
    assert plan.schemes["token_embd.weight"] == "Q6_K"
    odd = llama_like(n_embd=160, n_ff=160, head_dim=20)  # row length not a multiple of 256 -> Q8_0
    plan = plan_types(odd, facts_for("llama", odd, 8, 8, 2), "Q4_K_M")
    assert plan.schemes["output.weight"] == "Q8_0" and plan.schemes["token_embd.weight"] == "Q5_0"
    with pytest.raises(ConfigError, match="has_output"):
        plan_types(tied, ModelFacts("qwen2", 8, 8, 2, has_output=True), "Q4_0")


def test_gqa_dependent_attn_v_rules():
    t = llama_like()
    for n_head_kv, q2k, iq4 in [(2, "Q4_K", "Q5_K"), (4, "Q3_K", "IQ4_XS")]:  # n_gqa 4 vs 2
        f = ModelFacts("llama", 8, 8, n_head_kv)
        assert plan_types(t, f, "Q2_K").schemes["blk.3.attn_v.weight"] == q2k
        assert plan_types(t, f, "IQ4_XS").schemes["blk.3.attn_v.weight"] == iq4


def test_70b_rule():
    t = llama_like(n_layer=80, n_ff=32, head_dim=16, n_head=2, n_head_kv=1)
    gqa, mha = ModelFacts("llama", 80, 2, 1), ModelFacts("llama", 80, 2, 2)
    assert gqa.is_70b and not mha.is_70b and ModelFacts("qwen2", 80, 4, 4).is_70b
    assert not ModelFacts("llama", 80, 8, 1, n_expert=8).is_70b and not ModelFacts("deepseek2", 80, 8, 1).is_70b
    for ft, plain, big in [("Q4_K_M", "Q4_K", "Q5_K"), ("Q3_K_S", "Q3_K", "Q5_K"), ("Q2_K", "Q3_K", "Q5_K"),
                           ("Q5_K_M", "Q5_K", "Q5_K"), ("Q4_0", "Q4_0", "Q4_0")]:
        assert plan_types(t, mha, ft).schemes["blk.40.attn_v.weight"] == plain, ft
        assert plan_types(t, gqa, ft).schemes["blk.40.attn_v.weight"] == big, ft
    assert plan_types(t, gqa, "Q4_K_M").schemes["blk.0.attn_v.weight"] == "Q6_K"


def test_imatrix_dependent_rules():
    t = llama_like(n_layer=16)
    f = facts_for("llama", t, 16, 8, 4)
    for ft, with_im, without in [("Q4_0", "Q4_1", "Q4_0"), ("Q5_0", "Q5_1", "Q5_0"),
                                 ("IQ4_NL", "IQ4_NL", "Q5_K"), ("IQ4_XS", "IQ4_XS", "Q5_K")]:
        a, b = plan_types(t, f, ft, imatrix=True), plan_types(t, f, ft)
        assert layers_with(a, "ffn_down.weight", with_im) == ([0, 1] if with_im != ft else list(range(16))), ft
        assert layers_with(b, "ffn_down.weight", without) == ([0, 1] if without != ft else list(range(16))), ft


def test_deepseek2_moe_layers_fallbacks_and_unquantized():
    t = deepseek2_like(n_layer=8)
    f = facts_for("deepseek2", t, 8, 2, 1, n_expert=4)
    plan = plan_types(t, f, "Q4_K_M")
    # layer index parsed from the name for dense ffn_down, ffn_down_exps and ffn_down_shexp alike
    assert layers_with(plan, "ffn_down.weight", "Q6_K") == [0]
    assert layers_with(plan, "ffn_down_exps.weight", "Q6_K") == [3, 6, 7]
    assert layers_with(plan, "ffn_down_shexp.weight", "Q6_K") == [3, 6, 7]
    assert plan.schemes["blk.2.ffn_down_exps.weight"] == "Q4_K"
    for i in range(8):  # attn_k_b: row length 128 -> Q4_K falls back to Q5_0
        assert plan.schemes[f"blk.{i}.attn_k_b.weight"] == "Q5_0"
    assert {plan.schemes[f"blk.1.{n}.weight"] for n in ("attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_v_b",
                                                      "ffn_gate_exps", "ffn_up_shexp")} == {"Q4_K"}
    quantized = {e.name: e.quantized for e in plan.entries}
    for n in ("ffn_gate_inp.weight", "exp_probs_b.bias", "attn_kv_a_norm.weight", "attn_q_a_norm.weight"):
        assert plan.schemes[f"blk.1.{n}"] == "F32" and not quantized[f"blk.1.{n}"]
    for ft, k_b in [("Q6_K", "Q8_0"), ("Q2_K", "Q4_0"), ("Q3_K_S", "Q4_0"), ("Q5_K_S", "Q5_1"),
                    ("IQ4_XS", "IQ4_NL"), ("Q4_0", "Q4_0"), ("Q8_0", "Q8_0")]:
        assert plan_types(t, f, ft).schemes["blk.1.attn_k_b.weight"] == k_b, ft
    with pytest.raises(ConfigError, match="layer"):
        plan_types({"foo.ffn_down.weight": (256, 256)}, ModelFacts("deepseek2", 4, 2, 1, 4), "Q4_K_M")


def test_eight_expert_rules():
    t = llama_like(n_expert=8)
    f = facts_for("llama", t, 8, 8, 2, n_expert=8)
    for ft, attn_output in [("Q4_K_M", "Q5_K"), ("Q3_K_M", "Q5_K"), ("Q5_K_M", "Q5_K"), ("Q3_K_L", "Q3_K")]:
        plan = plan_types(t, f, ft)
        assert plan.schemes["blk.2.attn_v.weight"] == plan.schemes["blk.2.attn_k.weight"] == "Q8_0"
        assert plan.schemes["blk.2.attn_output.weight"] == attn_output, ft
    plan = plan_types(t, f, "Q4_K_M")
    assert layers_with(plan, "ffn_down_exps.weight", "Q6_K") == [0, 3, 6, 7]


# file types llama-quantize refuses without an imatrix: some tensor would be IQ3_XXS / IQ2_* / IQ1_*
NEED_IMATRIX = {"IQ3_XXS", "IQ3_XS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"}
IQ_FILE_TYPES = ["IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]


def test_i_quant_file_types_refused_without_imatrix():
    t = llama_like()
    f = facts_for("llama", t, 8, 8, 2)
    for ft in IQ_FILE_TYPES:
        if ft not in NEED_IMATRIX:
            plan_types(t, f, ft)
            continue
        with pytest.raises(ConfigError, match=rf"^{ft}: blk\.0\.\w+\.weight would be I.*pass one with --imatrix"):
            plan_types(t, f, ft)
    # the type decides, however chosen: an override too, but never for token_embd / output
    with pytest.raises(ConfigError, match="attn_q.weight would be IQ2_XS"):
        plan_types(t, f, "Q4_K_M", tensor_types=["attn_q=iq2_xs"])
    plan = plan_types(t, f, "Q4_K_M", output_tensor_type="iq2_xxs", token_embedding_type="iq1_s")
    assert (plan.schemes["output.weight"], plan.schemes["token_embd.weight"]) == ("IQ2_XXS", "IQ1_S")


def test_iq3_file_type_rules():
    t = llama_like(n_layer=16)
    f = facts_for("llama", t, 16, 8, 2)  # n_gqa 4
    s = plan_types(t, f, "IQ3_S").schemes
    assert (s["output.weight"], s["token_embd.weight"], s["blk.3.attn_v.weight"]) == ("Q6_K", "IQ3_S", "Q4_K")
    assert {s[f"blk.3.{n}.weight"] for n in ("attn_q", "attn_k", "attn_output", "ffn_down", "ffn_up")} == {"IQ3_S"}
    m = plan_types(t, f, "IQ3_M").schemes
    assert layers_with(plan_types(t, f, "IQ3_M"), "ffn_down.weight", "Q4_K") == [0, 1]
    assert (m["blk.3.attn_output.weight"], m["blk.3.attn_v.weight"], m["blk.3.ffn_up.weight"]) == ("Q4_K",) * 2 + (
        "IQ3_S",)
    xs = plan_types(t, f, "IQ3_XS", imatrix=True)
    assert layers_with(xs, "ffn_gate.weight", "IQ3_XXS") == layers_with(xs, "ffn_up.weight", "IQ3_XXS") == [
        *range(2, 14)]
    assert xs.schemes["blk.0.attn_q.weight"] == xs.schemes["blk.0.attn_k.weight"] == "IQ3_XXS"
    mha = ModelFacts("llama", 16, 8, 8)
    for imatrix, attn_v, down in [(True, "IQ3_XXS", "IQ3_XXS"), (False, "IQ3_S", "Q3_K")]:
        plan = plan_types(t, mha, "IQ3_XXS", imatrix=imatrix, tensor_types=["attn_[qk]=q4_k", "ffn_(gate|up)=q4_k"])
        s = plan.schemes
        assert (s["output.weight"], s["token_embd.weight"], s["blk.5.attn_output.weight"]) == ("Q5_K", "IQ3_S",
                                                                                               "IQ3_S")
        assert (s["blk.5.attn_v.weight"], s["blk.5.ffn_down.weight"]) == (attn_v, down)
        assert s["blk.0.ffn_down.weight"] == ("IQ3_XXS" if imatrix else "Q4_K")
    assert plan_types(t, f, "IQ3_XXS", imatrix=True).schemes["blk.0.attn_q.weight"] == "IQ2_S"


def test_iq1_iq2_file_type_rules():
    t = llama_like(n_layer=16)
    gqa2 = ModelFacts("llama", 16, 8, 4, has_output=True)
    for ft, default, embd, low in [("IQ2_XXS", "IQ2_XXS", "Q2_K", "Q2_K"), ("IQ2_XS", "IQ2_XS", "Q2_K", "Q2_K"),
                                   ("IQ2_S", "IQ2_XS", "IQ3_S", "IQ3_S"), ("IQ2_M", "IQ2_S", "IQ3_S", "IQ3_S"),
                                   ("IQ1_S", "IQ1_S", "Q2_K", "Q2_K"), ("IQ1_M", "IQ1_M", "Q2_K", "Q2_K")]:
        plan = plan_types(t, gqa2, ft, imatrix=True)
        s = plan.schemes
        assert (s["output.weight"], s["token_embd.weight"], s["blk.9.attn_v.weight"]) == ("Q5_K", embd, low), ft
        assert layers_with(plan, "ffn_down.weight", low) == [0, 1], ft  # the first n_layer/8 ffn_down tensors
        out = {"IQ1_S": "IQ2_XXS", "IQ1_M": "IQ2_XXS", "IQ2_S": "IQ3_S", "IQ2_M": "IQ3_S"}.get(ft, default)
        assert s["blk.9.attn_output.weight"] == out, ft
        assert {s[f"blk.9.{n}.weight"] for n in ("attn_q", "attn_k", "ffn_gate", "ffn_up", "ffn_down")} == {default}
        assert plan_types(t, facts_for("llama", t, 16, 8, 2), ft, imatrix=True).schemes[
            "blk.9.attn_v.weight"] == "Q4_K"  # n_gqa >= 4
    moe = deepseek2_like(n_layer=16)
    plan = plan_types(moe, facts_for("deepseek2", moe, 16, 2, 1, n_expert=4), "IQ2_XS", imatrix=True)
    # counted in quantize_order: dense blk.0.ffn_down, then blk.1's ffn_down_exps (not blk.1's shared expert)
    assert [n for n, ty in plan.schemes.items() if "ffn_down" in n and ty == "Q2_K"] == [
        "blk.0.ffn_down.weight", "blk.1.ffn_down_exps.weight"]
    mx = llama_like(n_expert=8)
    s = plan_types(mx, facts_for("llama", mx, 8, 8, 2, n_expert=8), "IQ1_M", imatrix=True).schemes
    assert (s["blk.2.attn_k.weight"], s["blk.2.attn_v.weight"], s["blk.2.attn_output.weight"]) == (
        "Q4_K", "Q4_K", "Q5_K")


def test_writer_refuses_a_very_low_bit_tensor_without_its_imatrix_entry(tmp_path):
    """As llama-quantize ("Missing importance matrix for tensor ..."), before anything is written."""
    out = GGUFOutput(tmp_path / "m.gguf", 23, {"token_embd.weight": "IQ2_XXS", "output.weight": "IQ1_S",
                                               "blk.0.attn_q.weight": "IQ2_S", "blk.0.attn_v.weight": "IQ3_S"})
    with pytest.raises(QuantkitError, match=r"blk\.0\.attn_q\.weight would be IQ2_S.*no entry for it"):
        check_importance([out], {"blk.1.attn_q.weight": torch.ones(4)})
    check_importance([out], {"blk.0.attn_q.weight": torch.ones(4)})
    assert not (tmp_path / "m.gguf").exists()


def test_fallback_to_f16_when_no_32_block_fits():
    t = {"blk.0.attn_q.weight": (48, 48), "blk.0.ffn_up.weight": (256, 48)}
    plan = plan_types(t, ModelFacts("llama", 1, 1, 1), "Q4_K_M")
    assert plan.schemes == {"blk.0.attn_q.weight": "F16", "blk.0.ffn_up.weight": "F16"}
    assert plan.entries[0].note == "fallback from Q4_K"


def test_overrides_precedence():
    t = llama_like()
    f = facts_for("llama", t, 8, 8, 2)
    # first matching pattern wins; an overridden attn_v does not advance the attn_v counter
    plan = plan_types(t, f, "Q3_K_M", tensor_types=[r"BLK\.0\.attn_v=q8_0", "attn_v=q6_k", r"blk\.1\.=f16"])
    assert plan.schemes["blk.0.attn_v.weight"] == "Q8_0" and plan.schemes["blk.1.attn_v.weight"] == "Q6_K"
    assert plan.schemes["blk.1.attn_q.weight"] == "F16" and plan.schemes["blk.2.attn_q.weight"] == "Q3_K"
    plan = plan_types(t, f, "Q3_K_M", tensor_types=[r"blk\.0\.attn_v=q8_0"])
    assert [plan.schemes[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q8_0", "Q5_K", "Q5_K", "Q4_K"]
    # an override naming the mixture's own default still skips the mixture rule
    plan = plan_types(t, f, "Q4_K_M", tensor_types=[("ffn_down", "Q4_K")])
    assert layers_with(plan, "ffn_down.weight", "Q4_K") == list(range(8))
    # --pure: no mixture rules, but --tensor-type still applies
    plan = plan_types(t, f, "Q4_K_M", pure=True, tensor_types=["attn_k=q8_0"])
    assert set(plan.schemes[n] for n in t if t[n].__len__() == 2 and "attn_k" not in n) == {"Q4_K"}
    assert plan.schemes["blk.3.attn_k.weight"] == "Q8_0"
    # --output-tensor-type / --token-embedding-type beat patterns, and apply even for F16 files
    plan = plan_types(t, f, "Q4_K_M", tensor_types=["output=q4_0", "token_embd=q4_0"], output_tensor_type="q8_0",
                      token_embedding_type="bf16")
    assert plan.schemes["output.weight"] == "Q8_0" and plan.schemes["token_embd.weight"] == "BF16"
    plan = plan_types(t, f, "F16", output_tensor_type="q6_k", tensor_types=["attn=q8_0"])
    assert plan.schemes["output.weight"] == "Q6_K" and plan.schemes["blk.0.attn_q.weight"] == "F16"
    # overrides are followed by the row-size fallback
    ds = deepseek2_like()
    plan = plan_types(ds, facts_for("deepseek2", ds, 4, 2, 1, 4), "Q8_0", tensor_types=["attn_k_b=q6_k"])
    assert plan.schemes["blk.0.attn_k_b.weight"] == "Q8_0"
    tied = llama_like(tied=True)
    ft = facts_for("qwen2", tied, 8, 8, 2)
    assert plan_types(tied, ft, "Q4_K_M", output_tensor_type="q5_k").schemes["token_embd.weight"] == "Q5_K"
    assert plan_types(tied, ft, "Q4_K_M", output_tensor_type="q5_k",
                      token_embedding_type="q8_0").schemes["token_embd.weight"] == "Q8_0"
    assert plan_types(tied, ft, "Q4_K_M", output_tensor_type="q5_k",
                      tensor_types=["token_embd=q4_0"]).schemes["token_embd.weight"] == "Q4_0"
    with pytest.raises(ConfigError, match="unknown ggml type"):
        plan_types(t, f, "Q4_0", output_tensor_type="q9_k")
    with pytest.raises(ConfigError, match="malformed"):
        plan_types(t, f, "Q4_0", tensor_types=["attn_v"])
    with pytest.raises(ConfigError, match="importance matrix"):
        plan_types(t, f, "Q4_0", tensor_types=["attn_v=iq2_xxs"])


def test_sizes_bpw_and_table():
    assert tensor_nbytes("Q4_K", (4096, 4096)) == 4096 * 16 * 144
    assert tensor_nbytes("F32", (7,)) == 28 and tensor_nbytes("Q8_0", (2, 3, 64)) == 6 * 2 * 34
    t = llama_like()
    plan = plan_types(t, facts_for("llama", t, 8, 8, 2), "Q6_K")
    assert plan.total_bytes == sum(tensor_nbytes(plan.schemes[n], s) for n, s in t.items())
    assert plan.n_elements == sum(int(np.prod(s)) for s in t.values())
    assert 6.5 < plan.bpw < 7.0  # Q6_K is 6.5625 bpw; the F32 norms add a little
    text = GGUF.describe(plan)
    assert re.search(r"blk\.0\.attn_q\.weight\s+\[256, 256\]\s+Q6_K\s+53,760", text)
    assert f"{plan.total_bytes:,} bytes" in text and f"{plan.bpw:.4f} bpw" in text
    assert "general.file_type = 18" in text


# ---------------------------------------------------------------------------------------------------------------
# interop: the same plans against llama.cpp's quantizer

try:
    import llama_cpp
except Exception as e:  # not installed, or its shared library fails to load
    llama_cpp = None
    _LLAMA_CPP_ERROR = f"llama_cpp is not importable ({type(e).__name__}: {e}); install llama-cpp-python"

needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason=_LLAMA_CPP_ERROR if llama_cpp is None else "")


def write_gguf(path, arch, tensors, kv):
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        getattr(w, "add_" + key)(value)
    rng = np.random.default_rng(0)
    for name, shape in tensors.items():
        w.add_tensor(name, rng.standard_normal(shape, dtype=np.float32) * 0.02)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_kv(n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab):
    return dict(block_count=n_layer, context_length=256, embedding_length=n_embd, feed_forward_length=n_ff,
                head_count=n_head, head_count_kv=n_head_kv, key_length=head_dim, value_length=head_dim,
                rope_dimension_count=head_dim, layer_norm_rms_eps=1e-5, vocab_size=n_vocab)


def deepseek2_kv(**kw):
    c = {**DS, **kw}
    return dict(block_count=c["n_layer"], context_length=256, embedding_length=c["n_embd"],
                feed_forward_length=c["n_ff"], head_count=c["n_head"], head_count_kv=1,
                key_length=c["kv_lora"] + c["rope"], value_length=c["kv_lora"],
                key_length_mla=c["nope"] + c["rope"], value_length_mla=c["v_head"],
                rope_dimension_count=c["rope"], layer_norm_rms_eps=1e-6, vocab_size=c["n_vocab"],
                leading_dense_block_count=c["n_dense"], q_lora_rank=c["q_lora"], kv_lora_rank=c["kv_lora"],
                expert_feed_forward_length=c["n_ff_exp"], expert_count=c["n_expert"], expert_used_count=2,
                expert_shared_count=c["n_shared"], expert_weights_scale=2.5, expert_weights_norm=True,
                expert_gating_func=gguf.ExpertGatingFuncType.SIGMOID)


# name -> (arch, tensors, facts, kv)
def _models():
    ll = dict(n_layer=8, n_embd=256, n_head=8, n_head_kv=2, head_dim=32, n_ff=256, n_vocab=64)
    qw = dict(n_layer=12, n_embd=256, n_head=4, n_head_kv=2, head_dim=32, n_ff=160, n_vocab=64)
    b70 = dict(n_layer=80, n_embd=256, n_head=2, n_head_kv=1, head_dim=16, n_ff=32, n_vocab=32)
    t_ll = llama_like(**ll, rope_freqs=True)
    t_qw = llama_like(**qw, tied=True, biases=True)
    t_70 = llama_like(**b70)
    t_ds = deepseek2_like()
    mx = dict(n_layer=8, n_embd=256, n_head=8, n_head_kv=2, head_dim=32, n_ff=32, n_vocab=64)
    t_mx = llama_like(**mx, n_expert=8)
    return {
        "llama": ("llama", t_ll, facts_for("llama", t_ll, 8, 8, 2), llama_kv(**ll)),
        "qwen2": ("qwen2", t_qw, facts_for("qwen2", t_qw, 12, 4, 2), llama_kv(**qw)),
        "llama70b": ("llama", t_70, facts_for("llama", t_70, 80, 2, 1), llama_kv(**b70)),
        "deepseek2": ("deepseek2", t_ds, facts_for("deepseek2", t_ds, 4, 2, 1, 4), deepseek2_kv()),
        "mixtral": ("llama", t_mx, facts_for("llama", t_mx, 8, 8, 2, 8),
                    {**llama_kv(**mx), "expert_count": 8, "expert_used_count": 2}),
    }


MODELS = _models()


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtures")
    made = {}

    def get(key):
        if key not in made:
            arch, tensors, _, kv = MODELS[key]
            made[key] = write_gguf(root / f"{key}.gguf", arch, tensors, kv)
        return made[key]

    return get


def _ones_imatrix(tensors) -> dict[str, np.ndarray]:
    """An all-ones entry for every weight: the rules only ask whether an imatrix is given, but the very-low-bit
    types refuse a tensor without its entry."""
    return {n: np.ones(shape[-1] * (shape[0] if len(shape) == 3 else 1), dtype=np.float32)
            for n, shape in tensors.items() if len(shape) >= 2 and n.endswith(".weight")}


def check_against_llama_cpp(gguf_model, tmp_path, key, file_type_name, **opts):
    """quantkit's plan against llama-quantize's (its --dry-run), tensor by tensor and in its order; or, where quantkit
    refuses the file for want of an imatrix, that llama-quantize refuses it too (None)."""
    arch, tensors, facts, _ = MODELS[key]
    cpp_opts = {k: v for k, v in opts.items() if k != "imatrix"}
    importance = _ones_imatrix(tensors) if opts.get("imatrix") else None
    ftype = file_type(file_type_name).ftype
    try:
        plan = plan_types(tensors, facts, file_type_name, **opts)
    except ConfigError as error:
        if "--imatrix" not in str(error):
            raise
        with pytest.raises(RuntimeError, match="llama_model_quantize failed"):  # refused before quantizing anything
            llama_quantize(gguf_model(key), tmp_path / "out.gguf", ftype, importance=importance, **cpp_opts)
        return None
    got = llama_quantize_types(gguf_model(key), ftype, importance=importance, **cpp_opts)
    assert [name for name, _ in got] == [e.name for e in plan.entries]  # the order llama-quantize writes
    diff = {n: (plan.schemes[n], t) for n, t in got if plan.schemes[n] != t}
    assert not diff, f"{key} {file_type_name} {opts}: (ours, llama.cpp) differ: {diff}"
    return plan


ALL = file_types()


@pytest.mark.interop
@needs_llama_cpp
@pytest.mark.parametrize("ft", ALL)
def test_llama_gqa_every_file_type(gguf_model, tmp_path, ft):
    plan = check_against_llama_cpp(gguf_model, tmp_path, "llama", ft)
    assert (plan is None) == (ft in NEED_IMATRIX)


@pytest.mark.interop
@needs_llama_cpp
@pytest.mark.parametrize("ft", ["Q2_K", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0",
                                "IQ4_XS", "F16"])
def test_qwen2_tied_embeddings(gguf_model, tmp_path, ft):
    check_against_llama_cpp(gguf_model, tmp_path, "qwen2", ft)


@pytest.mark.interop
@needs_llama_cpp
@pytest.mark.parametrize("ft", ALL)
def test_deepseek2_every_file_type(gguf_model, tmp_path, ft):
    plan = check_against_llama_cpp(gguf_model, tmp_path, "deepseek2", ft)
    assert (plan is None) == (ft in NEED_IMATRIX)


@pytest.mark.interop
@needs_llama_cpp
@pytest.mark.parametrize("ft", ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "IQ4_XS", "Q4_0"])
def test_mixtral_eight_experts(gguf_model, tmp_path, ft):
    check_against_llama_cpp(gguf_model, tmp_path, "mixtral", ft)


@pytest.mark.interop
@needs_llama_cpp
@pytest.mark.parametrize("ft", ["Q2_K", "Q3_K_S", "Q4_K_M"])
def test_llama_70b_rule(gguf_model, tmp_path, ft):
    plan = check_against_llama_cpp(gguf_model, tmp_path, "llama70b", ft)
    assert plan.schemes["blk.40.attn_v.weight"] == "Q5_K"


@pytest.mark.interop
@needs_llama_cpp
@pytest.mark.parametrize("key,ft", [("llama", "Q4_0"), ("llama", "Q5_0"), ("llama", "IQ4_NL"), ("llama", "IQ4_XS"),
                                    ("qwen2", "Q4_K_M"), ("deepseek2", "Q4_0"), ("deepseek2", "IQ4_XS")])
def test_with_imatrix(gguf_model, tmp_path, key, ft):
    check_against_llama_cpp(gguf_model, tmp_path, key, ft, imatrix=True)


@pytest.mark.interop
@needs_llama_cpp
@pytest.mark.parametrize("key,ft", [(key, ft) for key in ("llama", "qwen2", "deepseek2") for ft in IQ_FILE_TYPES]
                         + [("mixtral", ft) for ft in ("IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_S", "IQ1_M")]
                         + [("llama70b", "IQ3_M"), ("llama70b", "IQ3_XXS")])
def test_i_quant_file_types_with_imatrix(gguf_model, tmp_path, key, ft):
    """llama.cpp writes these types itself (its ggml has the codecs), so only the type table is compared."""
    assert check_against_llama_cpp(gguf_model, tmp_path, key, ft, imatrix=True) is not None


@pytest.mark.interop
@needs_llama_cpp
@pytest.mark.parametrize("key,ft,opts", [
    ("llama", "Q4_K_M", dict(pure=True)),
    ("deepseek2", "Q3_K_M", dict(pure=True)),
    ("llama", "Q4_K_M", dict(output_tensor_type="q8_0", token_embedding_type="q6_k")),
    ("qwen2", "Q4_K_M", dict(output_tensor_type="q5_k")),
    ("qwen2", "Q3_K_M", dict(output_tensor_type="q5_k", token_embedding_type="q8_0")),
    ("llama", "F16", dict(output_tensor_type="q8_0")),
    # overlapping patterns: the first match wins, mixture rules and counters skipped for it, then fallback
    ("llama", "Q3_K_M", dict(tensor_types=[r"blk\.0\.attn_v=q8_0", "attn_v=q6_k", r"blk\.[12]\.=iq4_nl"])),
    ("llama", "Q3_K_M", dict(tensor_types=[r"BLK\.0\.attn_v=q8_0"])),
    ("llama", "Q4_K_M", dict(tensor_types=["ffn_down=q4_k", "ffn=q5_0", "output=q4_0"], output_tensor_type="q8_0")),
    ("llama", "Q4_K_M", dict(pure=True, tensor_types=["attn_k=q8_0"])),
    ("qwen2", "Q4_K_M", dict(tensor_types=["token_embd=q4_0"], output_tensor_type="q5_k")),
    ("deepseek2", "Q4_K_M", dict(tensor_types=["attn_k_b=q6_k", "exps=q2_k", r"blk\.3\.ffn_down=q5_k"])),
])
def test_overrides(gguf_model, tmp_path, key, ft, opts):
    check_against_llama_cpp(gguf_model, tmp_path, key, ft, **opts)
