"""VRAM estimates: the weight and KV-cache parts of a GGUF estimate equal what llama.cpp itself allocates and
reports for the same file and context (within 5%, the log's MiB rounding), and a checkpoint's are its stored
bytes and the KV formulas of a GPU runtime."""

import contextlib
import io
import json
import logging
import re

import pytest

from quantkit.bundled import MODEL_NAMES, model_path
from quantkit.errors import ConfigError
from quantkit.model import Model
from quantkit.plan.vram import VramEstimate, kv_type_row_bytes, llama_cpp_n_ctx, vram_checkpoint, vram_gguf
from quantkit.source.gguf_file import GGUFFile
from quantkit.source.safetensors_file import SafetensorsFile

MiB = 1 << 20
TYPES = ("Q4_K_M", "F16")
CONTEXTS = (512, 2000)  # llama.cpp pads 2000 to 2048 cells
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def ggufs(bundled_gguf):
    """model name -> {file type -> GGUF path}: the session's shared files, converted on first use."""
    return lambda name: bundled_gguf.many(name, TYPES)


# ---- plain unit tests ---------------------------------------------------------------------------------------
def test_estimate_total_and_dict():
    e = VramEstimate(weights=10, kv_cache=5, compute=2)
    assert e.total == 17
    assert e.as_dict() == {"weights": 10, "kv_cache": 5, "compute": 2, "total": 17}


def test_llama_cpp_context_padding():
    assert [llama_cpp_n_ctx(c) for c in (1, 256, 257, 512, 2000)] == [256, 256, 512, 512, 2048]
    assert llama_cpp_n_ctx(0, n_ctx_train=4096) == 4096
    with pytest.raises(ConfigError):
        llama_cpp_n_ctx(0)


def test_kv_type_row_bytes():
    assert kv_type_row_bytes("f16", 128) == 256
    assert kv_type_row_bytes("F32", 128) == 512
    assert kv_type_row_bytes("q8_0", 128) == 4 * 34
    with pytest.raises(ConfigError):
        kv_type_row_bytes("q8_0", 100)
    with pytest.raises(ConfigError):
        kv_type_row_bytes("f12", 128)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_checkpoint_weights_are_stored_bytes(name):
    """Every stored byte of the checkpoint (FP8 weights with their float32 block scales, BF16, F32), read
    straight from the safetensors headers."""
    folder = model_path(name)
    stored = sum(e.nbytes for f in folder.glob("*.safetensors") for e in SafetensorsFile(f).entries.values())
    with Model(folder) as model:
        estimate = vram_checkpoint(model, 1024)
    assert estimate.weights == stored


def test_checkpoint_weights_skip_mtp_layers(model_cache):
    folder = model_cache("deepseek_v3", fp8=True)  # 3 layers and a multi-token-prediction layer 3
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    entries = {n: e for f in folder.glob("*.safetensors") for n, e in SafetensorsFile(f).entries.items()}
    mtp = {n for n in entries if n.startswith(f"model.layers.{layers}.")}
    assert mtp and any(entries[n].dtype == "F8_E4M3" for n in entries)
    with Model(folder) as model:
        estimate = vram_checkpoint(model, 256)
    assert estimate.weights == sum(e.nbytes for n, e in entries.items() if n not in mtp)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("ctx", (300, 2048))
def test_checkpoint_kv_cache(name, ctx):
    config = json.loads((model_path(name) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    with Model(model_path(name)) as model:
        for kv_type, dtype_bytes in (("f32", 4), ("bf16", 2)):
            kv = vram_checkpoint(model, ctx, kv_type).kv_cache
            if "kv_lora_rank" in config:  # MLA as vLLM caches it: the latent and the rope key
                expected = layers * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * ctx * dtype_bytes
            else:
                head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
                expected = 2 * layers * config["num_key_value_heads"] * head_dim * ctx * dtype_bytes
            assert kv == expected


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gguf_kv_cache_matches_checkpoint_formula(name, ggufs):
    """At a context llama.cpp does not pad, its f16 cache is the GPU runtime's 2-byte cache; the weights are
    the file's tensor bytes whatever the type."""
    with Model(model_path(name)) as model:
        ours = vram_checkpoint(model, 2048)
    for path in ggufs(name).values():
        gguf = GGUFFile(path)
        estimate = vram_gguf(gguf, 2048)
        assert estimate.kv_cache == ours.kv_cache
        assert estimate.weights == sum(t.nbytes for t in gguf.tensors.values())
        assert vram_gguf(gguf, 2000).kv_cache == estimate.kv_cache  # padded to 2048 cells
        assert vram_gguf(gguf, 2048, kv_type="q8_0").kv_cache == estimate.kv_cache * 34 // 64
        assert estimate.compute > 0
        assert vram_gguf(gguf, 4096).compute > estimate.compute  # the attention scores grow with the context


# ---- against llama.cpp --------------------------------------------------------------------------------------
def _mib(text: str, pattern: str) -> list[int]:
    return [round(float(m) * MiB) for m in re.findall(pattern, text)]


def llama_cpp_report(path, ctx: int) -> dict:
    """Load a GGUF in llama.cpp (CPU, without mmap: every tensor allocated once, as on a GPU) and read the
    sizes it logs. llama-cpp-python's log callback prints to Python's sys.stderr when verbose."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[test]')")
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log):
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_threads=1, use_mmap=False, verbose=True)
    finally:
        logger.setLevel(level)
    try:
        model_size = llama_cpp.llama_model_size(llm.model)
    finally:
        llm.close()
    text = log.getvalue()
    kv = re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells.*K \((\w+)\):\s*([\d.]+) MiB, "
                   r"V \((\w+)\):\s*([\d.]+) MiB", text)
    assert kv is not None, f"no KV cache line in llama.cpp's log:\n{text[-3000:]}"
    return {"model_buffers": _mib(text, r"load_tensors:\s+\S+ model buffer size =\s+([\d.]+) MiB"),
            "model_size": model_size,
            "kv_buffers": _mib(text, r"llama_kv_cache:\s+\S+ KV buffer size =\s+([\d.]+) MiB"),
            "cells": int(kv.group(2)), "k": round(float(kv.group(4)) * MiB), "v": round(float(kv.group(6)) * MiB),
            "compute": sum(_mib(text, r"\S+ compute buffer size =\s+([\d.]+) MiB"))}


def _close(ours: int, theirs: int) -> bool:
    return abs(ours - theirs) <= TOLERANCE * theirs


@pytest.mark.interop
@pytest.mark.parametrize("ctx", CONTEXTS)
@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gguf_estimate_matches_llama_cpp(name, type_name, ctx, ggufs):
    path = ggufs(name)[type_name]
    theirs = llama_cpp_report(path, ctx)
    gguf = GGUFFile(path)
    ours = vram_gguf(gguf, ctx)

    assert theirs["model_buffers"], "llama.cpp logged no model buffer"
    assert _close(ours.weights, sum(theirs["model_buffers"])), (ours.weights, theirs["model_buffers"])
    assert ours.weights == theirs["model_size"]

    assert theirs["cells"] == llama_cpp_n_ctx(ctx)
    assert _close(ours.kv_cache, sum(theirs["kv_buffers"])), (ours.kv_cache, theirs["kv_buffers"])
    assert _close(ours.kv_cache, theirs["k"] + theirs["v"])
    if gguf.metadata("general.architecture") == "deepseek2":
        assert theirs["v"] == 0  # MLA: V is a view of the cached latent, there is no V tensor
    # compute is an estimate of llama.cpp's allocator, only required to be of the right size
    assert 0.5 * theirs["compute"] <= ours.compute <= 2 * theirs["compute"], (ours.compute, theirs["compute"])
