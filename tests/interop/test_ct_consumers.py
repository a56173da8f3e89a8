"""The real consumer of quantkit's compressed-tensors folders: transformers' compressed-tensors integration
(transformers 5.17.0 + compressed-tensors 0.20.0, conftest.ct_env) loads what `quantkit convert --to ct:...` writes
for the three bundled models (tiny-deepseek from its FP8 checkpoint), uniform, mixed (two config groups) and
automatic (ct:auto: several groups and kept linears; ct:auto-gptq-act on tiny-deepseek), and
computes the logits quantkit's forward computes on the folder; compressed-tensors' own compressor, given the
dequantized weights and quantkit's scales and zero points, packs exactly the tensors quantkit stored.

Measured (main, float32 in both): llama and qwen2 identical logits (max |dlogit| 0.0) for w4g128, w8, w4g128-asym,
the mix, and (by hand) GPTQ and AWQ weights; DeepSeek-V3 2.1e-3 to 3.4e-3 of max |logit|: transformers 5 keeps
routed experts in fused 3-D parameters, which it fills from the per-expert tensors decompressed in the scales' dtype
(BF16). Asymmetric DeepSeek-V3 checkpoints (w4g128-asym, AWQ's; llm-compressor's own too) do not load there: the
expert fusion does not take weight_zero_point (a CONVERSION error); vLLM reads per-expert tensors itself.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantkit import convert as api
from quantkit.bundled import MODELS_DIR, textsets
from quantkit.formats.packing import unpack
from quantkit.model import Model
from quantkit.plan.allocate import Budget

pytestmark = pytest.mark.interop

MODELS = ["tiny-llama", "tiny-qwen2", "tiny-deepseek"]
# round-to-nearest (no calibration: seconds); GPTQ/AWQ weights are stored in the same tensors (tests/formats)
SCHEMES = ["w4g128", "w8", "w4g128-asym"]
# the mix: attention W8, MLP W4 g128 (lm_head stays BF16 in every ct output)
MIX = ("w4g128", ["self_attn=w8"])
# ct:auto between each model's uniform W4 g128 and W8 sizes (8.9-11.2, 8.1-10.7, 6.6-9.7 bpw): a mix of several
# config groups with kept (bf16) linears possible, measured on few tokens (the code path of a real measurement)
AUTO_BPW = {"tiny-llama": 10.0, "tiny-qwen2": 9.4, "tiny-deepseek": 8.1}
# and GPTQ in act-order (actorder "weight" in every config group) where transformers fuses the routed experts
AUTO_GPTQ_ACT = {"tiny-deepseek"}
WINDOWS, CONTEXT = 2, 96
# max |dlogit| / max |logit|: both sides float32 on the same dequantized weights (measured 0.0)
TOLERANCE = 1e-4
DEEPSEEK_TOLERANCE = 1e-2  # routed experts dequantized in BF16 by transformers (measured 2.1e-3 to 3.4e-3)


def _windows(model: Model) -> list[list[int]]:
    ids = model.tokenizer().encode(textsets.text("heldout")[:50000], add_special_tokens=False).ids
    step = len(ids) // WINDOWS
    return [ids[i * step:i * step + CONTEXT] for i in range(WINDOWS)]


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t for shard in folder.glob("*.safetensors") for name, t in load_file(shard).items()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{f"{model}:{scheme}": folder}, each folder's windows, and quantkit's logits on each folder."""
    out = tmp_path_factory.mktemp("ct")
    folders, windows, ours = {}, {}, {}
    for name in MODELS:
        converted = api.convert(MODELS_DIR / name, [f"ct:{s}" for s in SCHEMES], out)
        with Model(MODELS_DIR / name) as source:
            model_windows = _windows(source)
        mixed = api.convert(MODELS_DIR / name, [f"ct:{MIX[0]}"], out / "mix", tensor_types=MIX[1])
        autos = ["auto", *(["auto-gptq-act"] if name in AUTO_GPTQ_ACT else [])]
        auto = [output for spec in autos for output in api.convert(
            MODELS_DIR / name, [f"ct:{spec}"], out / spec, sensitivity_samples=2, calib_samples=8, calib_ctx=128,
            budget=Budget.from_options(target_bpw=AUTO_BPW[name]), sensitivity=out / f"{name}-{spec}.json")]
        for scheme, (path, _) in zip([*SCHEMES, "mix", *autos], converted + mixed + auto, strict=True):
            key = f"{name}:{scheme}"
            folders[key], windows[key] = path, model_windows
            with Model(path) as model:
                ours[key] = [model.forward(torch.tensor(w))[0] for w in model_windows]
    return folders, windows, ours


def test_transformers_logits_match_quantkit(written, ct_env, tmp_path, record_property):
    folders, windows, ours = written
    args = []
    for i, (key, folder) in enumerate(folders.items()):
        (tmp_path / f"w{i}.json").write_text(json.dumps(windows[key]))
        args += [folder, tmp_path / f"w{i}.json", tmp_path / f"out{i}.pt"]
    ct_env("ct_check.py", "logits", *args)
    failures = []
    for i, key in enumerate(folders):
        result = torch.load(tmp_path / f"out{i}.pt")
        asymmetric_moe = key.startswith("tiny-deepseek") and key.endswith("-asym")
        if "error" in result:
            if not (asymmetric_moe and "conversion" in result["error"].lower()):
                failures.append(f"{key}: transformers did not load it: {result['error'][:500]}")
            continue
        if asymmetric_moe:  # when transformers learns to fuse asymmetric experts, hold it to the tolerance
            failures.append(f"{key}: transformers now loads asymmetric DeepSeek-V3 experts: tighten the test")
        delta = max((t - o).abs().max().item() for t, o in zip(result["logits"], ours[key], strict=True))
        relative = delta / max(o.abs().max().item() for o in ours[key])
        record_property(key, {"max_abs_dlogit": delta, "relative": relative, "quantized": len(result["quantized"])})
        print(f"{key}: max |dlogit| {delta:.3e} (relative {relative:.2e}), {len(result['quantized'])} quantized "
              f"modules, {result['versions']}")
        limit = DEEPSEEK_TOLERANCE if key.startswith("tiny-deepseek") else TOLERANCE
        if not relative <= limit:  # also a NaN
            failures.append(f"{key}: max |dlogit| {delta:.3e} = {relative:.2e} of max |logit| > {limit}")
        if not result["quantized"]:
            failures.append(f"{key}: no quantized module in the loaded model")
    assert not failures, failures


def _group_of(module: str, groups: dict) -> dict:
    """The config group whose targets take the module (quantkit's groups are disjoint by construction)."""
    return next(g for g in groups.values() for t in g["targets"]
                if t == "Linear" or (t.startswith("re:") and re.match(t[3:], module)))


def test_compressed_tensors_packs_what_quantkit_stored(written, ct_env, tmp_path):
    """Per folder, layer 0's linears and one routed expert's: compressed-tensors' compressor on quantkit's
    dequantized weight with quantkit's scale and (signed) zero point gives the stored tensors bit for bit.
    Every folder's job goes to one driver run (one interpreter start, not one per folder)."""
    folders, _, _ = written
    args, checks = [], {}
    for i, (key, folder) in enumerate(folders.items()):
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        stored = _stored(folder)
        modules = sorted({n.rsplit(".", 1)[0] for n in stored if n.endswith(".weight_packed")
                          and (".layers.0." in n or ".experts.1." in n)})
        jobs: dict[str, dict] = {}
        with Model(folder) as model:
            for module in modules:
                group = _group_of(module, qc["config_groups"])
                bits = group["weights"]["num_bits"]
                tensors = {"weight": model.source.read(f"{module}.weight"),
                           "weight_scale": stored[f"{module}.weight_scale"]}
                if f"{module}.weight_zero_point" in stored:
                    zeros = unpack(stored[f"{module}.weight_zero_point"], bits, 0)[:tensors["weight"].shape[0]]
                    tensors["weight_zero_point"] = (zeros - 2 ** (bits - 1)).to(torch.int8)
                job = jobs.setdefault(json.dumps(group, sort_keys=True), {"scheme": group, "modules": {}})
                job["modules"][module] = tensors
        torch.save(list(jobs.values()), tmp_path / f"job{i}.pt")
        args += [tmp_path / f"job{i}.pt", tmp_path / f"packed{i}.pt"]
        checks[key] = (tmp_path / f"packed{i}.pt", modules, stored)
    ct_env("ct_check.py", "compress", *args)
    for key, (packed, modules, stored) in checks.items():
        theirs = torch.load(packed)
        assert modules and set(theirs) == set(modules), key
        for module, compressed in theirs.items():
            for suffix in ("weight_packed", "weight_shape", "weight_zero_point"):
                if suffix in compressed or f"{module}.{suffix}" in stored:
                    assert torch.equal(compressed[suffix], stored[f"{module}.{suffix}"]), (key, module, suffix)
