"""AutoGPTQ 0.7.1's own loader (AutoGPTQForCausalLM.from_quantized, torch QuantLinear on the CPU) on the GPTQ folders
`quantkit convert --to gptq:...` writes, as they are (sharded model-0000k-of-0000n.safetensors with
model.safetensors.index.json: AutoGPTQ finds `model_file_base_name` + ".safetensors.index.json"), compared with
quantkit's forward on the same dequantized weights. Runs in its own venv (conftest.autogptq_env), which is only
there where it was built beforehand: tests/interop/autogptq_check.py builds it, runs this file and records the
result in bench/results/autogptq_load.md.

llama and qwen2 are in AutoGPTQ's model registry; DeepSeek-V3 is not (and transformers 4.43 does not know it):
tiny-deepseek must fail to load, with that reason.

tiny-qwen2 (tied embeddings) needs the `lm_head.weight` quantkit stores for a tied head: from_quantized loads through
accelerate's load_checkpoint_in_model(offload_state_dict=True), which loads model.embed_tokens.weight into a new
tensor and then re-ties the group [lm_head.weight, model.embed_tokens.weight] to its first non-meta member; without
lm_head.weight in the file that is a never-loaded tensor and both end up uninitialised (zeros or NaN), as measured
before quantkit wrote it. AutoGPTQ's own save_quantized writes the full state_dict, lm_head.weight included.
"""

import json

import pytest
import torch
from test_gptq_consumers import SCHEMES, _relative_error, _write

pytestmark = pytest.mark.interop

# max |dlogit| / max |logit| over the windows, as in test_gptq_consumers. AutoGPTQ's torch QuantLinear dequantizes
# the same codes, fp16 scales and zeros and multiplies in float32: measured 0 (bitwise equal) on tiny-llama's 96-token
# windows, 5.7e-6 absolute on a 6-token probe (length-dependent kernels on both sides).
TOLERANCE = 1e-3


def _autogptq(run, folders: dict, windows, tmp) -> dict[str, dict]:
    (tmp / "windows.json").write_text(json.dumps(windows))
    args = []
    for scheme, folder in folders.items():
        args += [folder, tmp / f"autogptq-{scheme}.pt"]
    run("autogptq_logits.py", tmp / "windows.json", *args)
    return {scheme: torch.load(tmp / f"autogptq-{scheme}.pt") for scheme in folders}


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_autogptq_logits_match_quantkit(name, autogptq_env, tmp_path, record_property):
    folders, windows, ours = _write(name, tmp_path, SCHEMES)
    theirs = _autogptq(autogptq_env, folders, windows, tmp_path)
    failures = []
    for scheme in SCHEMES:
        result = theirs[scheme]
        assert "error" not in result, f"{name} {scheme}: AutoGPTQ did not load it: {result.get('error')}"
        # NaN first: _relative_error's max() over windows can step over a NaN.
        finite = all(torch.isfinite(t).all() for t in result["logits"])
        delta, relative = _relative_error(result["logits"], ours[scheme]) if finite else (float("nan"),) * 2
        record_property(f"{name}:{scheme}", json.dumps({"max_abs_dlogit": delta, "relative": relative,
                                                        "kernels": result["kernels"], "versions": result["versions"]}))
        print(f"{name} gptq:{scheme}: max |dlogit| {delta:.3e} (relative {relative:.2e}), kernels "
              f"{result['kernels']}, {result['versions']}")
        if not finite:
            failures.append(f"{scheme}: non-finite logits")
        if not result["kernels"]:
            failures.append(f"{scheme}: no quantized linear in the loaded model")
        if relative > TOLERANCE:
            failures.append(f"{scheme}: max |dlogit| {delta:.3e} = {relative:.2e} of max |logit| > {TOLERANCE}")
    assert not failures, failures


def test_deepseek_is_not_supported(autogptq_env, tmp_path, record_property):
    folders, windows, _ = _write("tiny-deepseek", tmp_path, ["w4g128"])
    result = _autogptq(autogptq_env, folders, windows, tmp_path)["w4g128"]
    record_property("tiny-deepseek:w4g128", json.dumps({"error": result.get("error"), "versions": result["versions"]}))
    print(f"tiny-deepseek gptq:w4g128 in AutoGPTQ: {result.get('error')}, {result['versions']}")
    # When AutoGPTQ loads it, compare its logits as for the dense models.
    assert "deepseek_v3" in result.get("error", ""), result.get("error") or "AutoGPTQ loaded tiny-deepseek"


def test_mixes_are_refused(autogptq_env, tmp_path, record_property):
    """AutoGPTQ predates GPTQModel's `dynamic`: it builds every linear at the top-level scheme and refuses a mix on
    the first stored tensor of another shape (measured: ValueError on a w8 down_proj's qweight), rather than
    loading something else."""
    folders, windows, _ = _write("tiny-llama", tmp_path, ["w4g128"], tensor_types=["mlp.down_proj=w8"])
    result = _autogptq(autogptq_env, folders, windows, tmp_path)["w4g128"]
    record_property("tiny-llama:w4g128 mix", json.dumps({"error": result.get("error"), "versions": result["versions"]}))
    print(f"tiny-llama gptq:w4g128 mix in AutoGPTQ: {result.get('error')}")
    assert "qweight" in result.get("error", ""), result.get("error") or "AutoGPTQ loaded a mix"
