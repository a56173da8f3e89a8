"""`--to gguf:TYPE-gptq` / `gguf:auto-gptq`: GPTQ-chosen levels in plain llama.cpp types, from a calibration
pass (quantkit.formats.gguf.calibrated) that spools encoded rows per layer and resumes."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from quantkit import convert as api
from quantkit.arch import load_architecture
from quantkit.bundled import model_path, textsets
from quantkit.cli import main
from quantkit.errors import ConfigError, QuantkitError
from quantkit.formats import get_format
from quantkit.formats.gguf.calibrated import Spool, calibrate, spool_folder
from quantkit.formats.gguf.tensors import mapping_for
from quantkit.model import Model
from quantkit.source.gguf_file import GGUFFile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))
from test_llama_cpp import assert_logits_match_quantkit_forward  # noqa: E402

IMATRIX = Path(__file__).resolve().parents[1] / "data" / "llama_imatrix" / "tiny-llama.imatrix.gguf"
CALIB = dict(calib_samples=4, calib_ctx=128)  # small: what is tested is the mechanism, not the amount


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-gptq")
    written = api.convert(model_path("tiny-llama"), ["gguf:Q4_K_M", "gguf:Q4_K_M-gptq"], out, imatrix=IMATRIX,
                          **CALIB)
    return {plan.target + ("-gptq" if "gptq" in path.name else ""): path for path, plan in written}


def test_spec_names_and_file(llama_files):
    fmt = get_format("gguf")
    assert fmt.parse_spec("q4_k_m-gptq").spec == "Q4_K_M-gptq"
    assert fmt.parse_spec("AUTO-gptq").spec == "auto-gptq"
    path = llama_files["Q4_K_M-gptq"]
    assert path.name == "tiny-llama-Q4_K_M-gptq.gguf"
    assert not spool_folder(path).exists()  # removed once the file is complete
    meta = GGUFFile(path)
    assert (meta.metadata("quantize.gptq.samples"), meta.metadata("quantize.gptq.ctx")) == (4, 128)
    assert meta.metadata("quantize.gptq.damp_percent") == pytest.approx(0.01)
    assert meta.metadata("quantize.imatrix.file")  # the imatrix's provenance as llama-quantize writes it
    assert GGUFFile(llama_files["Q4_K_M"]).metadata("quantize.gptq.samples") is None


def test_same_types_other_levels_where_calibrated(llama_files):
    plain, gptq = GGUFFile(llama_files["Q4_K_M"]), GGUFFile(llama_files["Q4_K_M-gptq"])
    assert {n: (plain.type_name(n), plain.shape(n)) for n in plain.tensors} == \
           {n: (gptq.type_name(n), gptq.shape(n)) for n in gptq.tensors}
    for name in plain.tensors:
        same = (plain.data(name) == gptq.data(name)).all()
        calibrated = (name.startswith("blk.") or name == "output.weight") and plain.type_name(name) not in (
            "F32", "F16", "BF16")
        assert same != calibrated, name  # token embeddings and norms as llama-quantize; linears and head re-chosen


def test_llama_cpp_loads_it_and_agrees(llama_files):
    assert_logits_match_quantkit_forward(model_path("tiny-llama"), llama_files["Q4_K_M-gptq"], "Q4_K_M")


def test_eval_names_the_encoding(llama_files):
    from quantkit.evaluation.variants import _file_type_name

    assert _file_type_name(GGUFFile(llama_files["Q4_K_M-gptq"])) == "Q4_K_M-gptq"
    assert _file_type_name(GGUFFile(llama_files["Q4_K_M"])) == "Q4_K_M"


def _kld(model_dir: Path, gguf: Path, windows: torch.Tensor) -> float:
    arch = load_architecture(json.loads((model_dir / "config.json").read_text()))
    with Model(model_dir) as model:
        base = F.log_softmax(arch.forward(model.weights(), windows), -1)
    quant = F.log_softmax(arch.forward(mapping_for(arch).weights_from_gguf(GGUFFile(gguf).read), windows), -1)
    return float((base.exp() * (base - quant)).sum(-1).mean())


def test_gptq_levels_beat_llama_quantize_s_on_held_out_text(llama_files):
    with Model(model_path("tiny-llama")) as model:
        ids = model.tokenizer().encode(textsets.text("heldout")[:40000], add_special_tokens=False).ids
    windows = torch.tensor(ids[:4 * 128]).reshape(4, 128)
    plain = _kld(model_path("tiny-llama"), llama_files["Q4_K_M"], windows)
    gptq = _kld(model_path("tiny-llama"), llama_files["Q4_K_M-gptq"], windows)
    assert gptq < 0.85 * plain, (gptq, plain)


def test_a_killed_pass_resumes_with_identical_bytes(tmp_path, killed_at_layer):
    with Model(model_path("tiny-llama")) as model:
        [(path, plan)] = api.convert(model_path("tiny-llama"), ["gguf:Q3_K_M-gptq"], tmp_path, dry_run=True)
        outputs = [(path, plan.schemes)]
        with killed_at_layer(1):  # dies as layer 1 is finished, before it is spooled
            calibrate(model, outputs, {}, calib=None, samples=2, ctx=64, damp=None)
        folder = spool_folder(path)
        assert sorted(p.name for p in folder.glob("layer-*.npz")) == ["layer-00000.npz"]
        calibrate(model, outputs, {}, calib=None, samples=2, ctx=64, damp=None)  # resumes at layer 1
        resumed = {p.name: p.read_bytes() for p in folder.glob("layer-*.npz")}
        assert len(resumed) == model.arch.num_layers
        for p in folder.glob("layer-*.npz"):
            p.unlink()
        calibrate(model, outputs, {}, calib=None, samples=2, ctx=64, damp=None)  # from the start
        assert resumed == {p.name: p.read_bytes() for p in folder.glob("layer-*.npz")}


def test_a_spool_of_another_run_is_not_reused(tmp_path):
    """The key covers the model, the calibration tokens, the plan's types, damping and the imatrix."""
    folder = tmp_path / "out.gguf.gptq.part"
    Spool(folder, "one", 2).save(0, {"blk.0.attn_q.weight": {0: np.zeros((2, 144), np.uint8)}})
    assert Spool(folder, "one", 2).has(0)
    assert not Spool(folder, "two", 2).has(0)


def test_moe_model_experts_and_mla(tmp_path):
    """tiny-deepseek: routed experts from their routed tokens' Hessians, k_b/v_b left to the writer."""
    [(path, _)] = api.convert(model_path("tiny-deepseek"), ["gguf:Q4_K_M-gptq"], tmp_path, **CALIB)
    assert_logits_match_quantkit_forward(model_path("tiny-deepseek"), path, "Q4_K_M")


def test_refused_on_a_gguf_source(llama_files, tmp_path):
    with pytest.raises(ConfigError, match="give the HF checkpoint"):
        api.convert(llama_files["Q4_K_M"], ["gguf:Q4_K_M-gptq"], tmp_path, dry_run=True)


def test_nan_weight_is_named_and_nothing_is_written(copy_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_model("llama")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    tensors = load_file(folder / index[name])
    tensors[name][3, 5] = float("nan")
    save_file(tensors, folder / index[name], metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(QuantkitError, match=r"blk\.1\.ffn_down\.weight has 1 NaN/Inf"):
        api.convert(folder, ["gguf:Q4_K_M-gptq"], out, **CALIB)
    assert not list(out.glob("*.gguf"))


def test_auto_gptq_measures_candidates_as_the_pass_encodes_them():
    """gguf:auto-gptq's costs: GPTQ's encoding for the linears and the untied head (cheaper than the writer's
    round-to-nearest at the same type), the writer's own for the token embeddings (the same cost)."""
    from quantkit.calib.data import calibration_samples
    from quantkit.calib.gptq import CalibrationHessians
    from quantkit.calib.imatrix import Imatrix
    from quantkit.calib.sensitivity import Group, measure
    from quantkit.formats.gguf.auto import Candidates, GPTQCandidates
    from quantkit.quant.ggml_gptq import DEFAULT_DAMP_PERCENT

    with Model(model_path("tiny-llama")) as model:
        importance = Imatrix.load(IMATRIX).importances()
        samples = calibration_samples(model, None, 2, 128)
        hessians = CalibrationHessians(model.arch, model.weights(), calibration_samples(model, None, 8, 128))
        plain, gptq = Candidates(model, importance), GPTQCandidates(model, importance, DEFAULT_DAMP_PERCENT, hessians)
        names = ["token_embd.weight", "blk.1.ffn_down.weight", "blk.2.attn_q.weight", "output.weight"]
        groups = [Group(n, plain.group(n).stage, ("Q3_K",), (0,)) for n in names]
        rtn = measure(model.arch, model.weights(), samples, groups, plain.degrade)
        calibrated = measure(model.arch, model.weights(), samples, groups, gptq.degrade, prepare=gptq.prepare)
    assert calibrated["token_embd.weight"] == rtn["token_embd.weight"]
    for name in names[1:]:
        assert calibrated[name]["Q3_K"] < 0.9 * rtn[name]["Q3_K"], (name, calibrated[name], rtn[name])


def test_auto_gptq_measurement_depends_on_the_gptq_calibration(tmp_path):
    """The -gptq candidates are encoded from the Hessians of the file's own calibration samples: another
    --calib-samples is another measurement (a stored one is not reused), while gguf:auto's stays the same."""
    from tests.conftest import bundled_imatrix_file

    def key(target: str, calib_samples: int) -> str:
        sensitivity = tmp_path / f"{target}.json"
        args = ["convert", "tiny-llama", "--to", target, "--target-bpw", "4", "--dry-run",
                "--imatrix", str(bundled_imatrix_file("tiny-llama")), "--sensitivity", str(sensitivity),
                "--sensitivity-samples", "1", "--calib-ctx", "64", "--calib-samples", str(calib_samples),
                "-o", str(tmp_path)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        return json.loads(sensitivity.read_text())["key"]

    assert key("gguf:auto-gptq", 1) != key("gguf:auto-gptq", 2)
    assert key("gguf:auto", 1) == key("gguf:auto", 2)


def test_auto_gptq_mix_is_named_as_such(tmp_path):
    """The -gptq mix is labelled gguf:auto-gptq in the dry-run table and the `wrote` line, as its file is named."""
    from tests.conftest import bundled_imatrix_file

    args = ["convert", "tiny-llama", "--to", "gguf:auto-gptq", "--target-bpw", "4",
            "--imatrix", str(bundled_imatrix_file("tiny-llama")), "--sensitivity", str(tmp_path / "sens.json"),
            "--sensitivity-samples", "1", "--calib-ctx", "64", "--calib-samples", "1", "-o", str(tmp_path)]
    result = CliRunner().invoke(main, args + ["--dry-run"])
    assert result.exit_code == 0, result.output
    assert "gguf:auto-gptq (--target-bpw 4), predicted KLD" in result.output
    assert "tiny-llama-auto-gptq-4.00bpw.gguf" in result.output
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "(gguf:auto-gptq-4.00bpw," in result.output
