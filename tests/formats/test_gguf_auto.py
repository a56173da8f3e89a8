"""gguf:auto: per-tensor llama.cpp types chosen from measured costs to a budget, written as a plain GGUF."""

import json

import pytest
from click.testing import CliRunner

from quantkit import convert as api
from quantkit.bundled import model_path
from quantkit.cli import main
from quantkit.errors import ConfigError
from quantkit.formats.gguf.auto import CANDIDATES, Candidates
from quantkit.formats.gguf.file import read_header
from quantkit.model import Model
from quantkit.plan import Plan
from quantkit.plan.allocate import Budget, BudgetError
from quantkit.plan.vram import vram_gguf
from quantkit.source.gguf_file import GGUFFile

MEASURE = dict(sensitivity_samples=2, calib_ctx=128)  # the code path of a real measurement, on fewer tokens


@pytest.fixture(scope="module")
def sensitivity(tmp_path_factory):
    """tiny-llama's measurement with the bundled imatrix, made once for the module (the dry run makes it)."""
    from tests.conftest import bundled_imatrix_file

    path = tmp_path_factory.mktemp("sens") / "tiny-llama.sensitivity.json"
    imatrix = bundled_imatrix_file("tiny-llama")
    api.convert(model_path("tiny-llama"), ["gguf:auto"], dry_run=True, imatrix=imatrix, sensitivity=path,
                budget=Budget.from_options(target_bpw=4.5), **MEASURE)
    return path, imatrix


def _auto(tmp_path, sensitivity, budget: Budget, **kwargs):
    path, imatrix = sensitivity
    [(file, plan)] = api.convert(model_path("tiny-llama"), ["gguf:auto"], tmp_path, imatrix=imatrix,
                                 sensitivity=path, budget=budget, **MEASURE, **kwargs)
    return file, plan


def _never_measure(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the stored sensitivity was not reused")

    monkeypatch.setattr("quantkit.calib.sensitivity.measure", fail)


@pytest.mark.parametrize("bpw", [3.2, 4.0, 5.5])
def test_bpw_budgets_are_met_and_recorded(tmp_path, sensitivity, monkeypatch, bpw):
    _never_measure(monkeypatch)
    file, plan = _auto(tmp_path, sensitivity, Budget.from_options(target_bpw=bpw))
    assert file.name == f"tiny-llama-auto-{bpw:.2f}bpw.gguf"
    gguf = GGUFFile(file)
    stored = sum(gguf.data(n).nbytes for n in gguf.tensors)
    n_elements = plan.n_elements
    assert 8 * stored / n_elements <= bpw
    assert 8 * stored / n_elements > bpw - 0.35  # the budget is used, not just respected
    types = {n: gguf.type_name(n) for n in gguf.tensors}
    saved = Plan.load(file.with_name(f"tiny-llama-auto-{bpw:.2f}bpw.plan.json"))
    assert saved.schemes == types == plan.schemes
    assert {t for e in saved.entries if e.note == "auto" for t in [e.scheme]} <= set(CANDIDATES)
    meta = read_header(file).metadata
    assert meta["quantize.auto.budget"].value == f"--target-bpw {bpw:g}"
    assert meta["quantize.auto.predicted_kld"].value > 0
    assert meta["quantize.auto.sensitivity_key"].value == json.loads(sensitivity[0].read_text())["key"]


def test_bigger_budgets_buy_lower_predicted_kld(tmp_path, sensitivity, monkeypatch):
    _never_measure(monkeypatch)
    predicted = []
    for bpw in (3.0, 4.0, 6.0):
        file, _ = _auto(tmp_path / str(bpw), sensitivity, Budget.from_options(target_bpw=bpw))
        predicted.append(read_header(file).metadata["quantize.auto.predicted_kld"].value)
    assert predicted[0] > predicted[1] > predicted[2]


def test_size_budget_bounds_the_file(tmp_path, sensitivity, monkeypatch):
    _never_measure(monkeypatch)
    size = 2_100_000
    file, _ = _auto(tmp_path, sensitivity, Budget.from_options(target_size=str(size)))
    assert size - 60_000 < file.stat().st_size <= size


def test_fit_vram_fits_by_llama_cpp_accounting(tmp_path, sensitivity, monkeypatch, bundled_gguf):
    _never_measure(monkeypatch)
    q4 = vram_gguf(GGUFFile(bundled_gguf("tiny-llama", "Q4_K_M", imatrix=True)), 1024, "f16").total
    vram = q4 - (300 << 10)  # what Q4_K_M needs at this context, less 300 KiB
    file, _ = _auto(tmp_path, sensitivity, Budget.from_options(fit_vram=str(vram), ctx=1024))
    estimate = vram_gguf(GGUFFile(file), 1024, "f16")
    assert vram - (100 << 10) < estimate.total <= vram


@pytest.mark.parametrize("budget, least", [(dict(target_bpw=1.0), r"\d\.\d\d bpw"),
                                           (dict(fit_vram="1MiB", ctx=4096), r"[\d.]+ MiB per GPU at ctx 4096"),
                                           (dict(target_size="100KB"), r"[\d,]+ bytes")])
def test_impossible_budget_names_the_smallest_mix(tmp_path, sensitivity, monkeypatch, budget, least):
    _never_measure(monkeypatch)
    with pytest.raises(BudgetError, match=f"below the smallest mix gguf:auto can make of this model \\({least}"):
        _auto(tmp_path, sensitivity, Budget.from_options(**budget))
    assert not list(tmp_path.iterdir())


def test_budget_and_auto_come_together(tmp_path):
    with pytest.raises(ConfigError, match="gguf:auto needs a budget"):
        api.convert(model_path("tiny-llama"), ["gguf:auto"], tmp_path)
    with pytest.raises(ConfigError, match="applies to automatic mixes only"):
        api.convert(model_path("tiny-llama"), ["gguf:Q4_K_M"], tmp_path, budget=Budget.from_options(target_bpw=4))


def test_overrides_stay_fixed(tmp_path, sensitivity):
    [(_, plan)] = api.convert(model_path("tiny-llama"), ["gguf:auto"], tmp_path, dry_run=True,
                              imatrix=sensitivity[1], sensitivity=sensitivity[0], tensor_types=["attn_v=q8_0"],
                              budget=Budget.from_options(target_bpw=4.0), **MEASURE)
    assert all(plan.schemes[f"blk.{i}.attn_v.weight"] == "Q8_0" for i in range(4))
    assert plan.bpw <= 4.0


def test_mla_split_tensors_map_back_to_kv_b():
    """DeepSeek's attn_k_b / attn_v_b both come from kv_b_proj: a candidate for either rebuilds kv_b_proj."""
    with Model(model_path("tiny-deepseek")) as model:
        candidates = Candidates(model, None)
        group = candidates.group("blk.0.attn_k_b.weight")
        replaced = candidates.degrade(group, group.schemes[0])
        assert list(replaced) == ["model.layers.0.self_attn.kv_b_proj.weight"]
        original = model.weights()("model.layers.0.self_attn.kv_b_proj.weight")
        changed = (replaced["model.layers.0.self_attn.kv_b_proj.weight"] != original).view(
            model.arch.num_heads, -1, original.shape[1])
        nope = model.arch.qk_nope_head_dim
        assert changed[:, :nope].any() and not changed[:, nope:].any()  # only the k rows are requantized


def test_dry_run_prints_the_chosen_plan(tmp_path, sensitivity):
    result = CliRunner().invoke(main, ["convert", "tiny-llama", "--to", "gguf:auto", "--target-bpw", "4",
                                       "--imatrix", str(sensitivity[1]), "--sensitivity", str(sensitivity[0]),
                                       "--sensitivity-samples", "2", "--calib-ctx", "128", "--dry-run",
                                       "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "gguf:auto (--target-bpw 4), predicted KLD" in result.output
    assert "tiny-llama-auto-4.00bpw.gguf" in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.interop
def test_llama_cpp_loads_auto_files_and_agrees(tmp_path, sensitivity):
    pytest.importorskip("llama_cpp")
    import numpy as np
    import torch

    from quantkit.evaluation.llama_cpp_guard import open_llama
    from quantkit.formats.gguf.tensors import mapping_for

    file, _ = _auto(tmp_path, sensitivity, Budget.from_options(target_bpw=3.5))
    ids = torch.randint(3, 3072, (64,), generator=torch.Generator().manual_seed(2))
    llm = open_llama(file, n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids.tolist())
    theirs = torch.from_numpy(np.array(llm.scores[:64], dtype=np.float32))
    with Model(model_path("tiny-llama")) as model:
        ours = model.arch.forward(mapping_for(model.arch).weights_from_gguf(GGUFFile(file).read), ids)[0]
    assert ((theirs - ours).abs().max(-1).values / ours.abs().max()).max() < 4e-2


@pytest.mark.interop
def test_fit_vram_output_fits_by_llama_cpps_own_buffers(tmp_path, sensitivity, bundled_gguf):
    pytest.importorskip("llama_cpp")
    from quantkit.testing.llama_cpp_memory import measure_in_subprocess

    ctx = 1024
    vram = vram_gguf(GGUFFile(bundled_gguf("tiny-llama", "Q4_K_M", imatrix=True)), ctx, "f16").total - (300 << 10)
    file, _ = _auto(tmp_path, sensitivity, Budget.from_options(fit_vram=str(vram), ctx=ctx))
    [measured] = measure_in_subprocess(file, [ctx], "f16", timeout=300)
    total = measured["model_size"] + sum(measured["kv_buffers"].values()) + sum(measured["compute_buffers"].values())
    assert total <= vram, (total, vram, measured)


def test_another_imatrix_is_measured_again(tmp_path, sensitivity, monkeypatch):
    from quantkit.calib.imatrix import Imatrix

    other = Imatrix.load(sensitivity[1])
    for name in other.sums:
        other.sums[name] = other.sums[name] * 2 + 1  # same entries, other values
    other.save(tmp_path / "other.imatrix.gguf")
    _never_measure(monkeypatch)
    with pytest.raises(AssertionError, match="not reused"):
        api.convert(model_path("tiny-llama"), ["gguf:auto"], dry_run=True, imatrix=tmp_path / "other.imatrix.gguf",
                    sensitivity=sensitivity[0], budget=Budget.from_options(target_bpw=4.5), **MEASURE)


def test_i_quants_are_candidates_on_moe_models_where_the_imatrix_reaches():
    """They need importance data: only the tensors the imatrix covers get them, and only on MoE models, whose
    routed experts are what they are for."""
    import torch

    with Model(model_path("tiny-deepseek")) as moe, Model(model_path("tiny-llama")) as dense:
        covered = {"blk.2.ffn_up_exps.weight": torch.ones(8 * 256), "blk.0.attn_q_a.weight": torch.ones(256),
                   "blk.0.attn_q.weight": torch.ones(256)}
        experts = Candidates(moe, covered).group("blk.2.ffn_up_exps.weight").schemes
        assert {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"} <= set(experts)
        assert set(CANDIDATES) <= set(experts)
        assert Candidates(moe, covered).group("blk.2.ffn_down_exps.weight").schemes == CANDIDATES  # not covered
        assert not {"IQ1_S", "IQ2_XXS"} & set(Candidates(dense, covered).group("blk.0.attn_q.weight").schemes)
        # gguf:auto-gptq: GPTQ cannot choose the grid i-quants' levels, so they are no candidates there
        gptq = Candidates(moe, covered, grid_iquants=False)
        assert gptq.group("blk.2.ffn_up_exps.weight").schemes == CANDIDATES


def test_default_proxy_method_measures_q3_k_as_the_output_method_does(tmp_path, sensitivity):
    """gguf:auto's default, the proxy method: every tensor's Q3_K cost as --sensitivity-method output measures it,
    the other types priced from their layer's output; the two are stored apart, and each mix meets the budget."""
    store = tmp_path / "output.json"
    file, plan = _auto(tmp_path, (store, sensitivity[1]), Budget.from_options(target_bpw=4.0),
                       sensitivity_method="output")
    assert 3.65 < plan.bpw <= 4.0 and file.is_file()
    proxy, output = (json.loads(p.read_text()) for p in (sensitivity[0], store))
    assert (proxy["method"], output["method"]) == ("proxy", "output") and proxy["key"] != output["key"]
    costs = [{g["name"]: {c["scheme"]: c["kld"] for c in g["candidates"]} for g in s["groups"]}
             for s in (proxy, output)]
    for name, by_type in costs[0].items():
        assert by_type["Q3_K"] == pytest.approx(costs[1][name]["Q3_K"], rel=1e-4, abs=1e-9), name
        if name != "output.weight":  # the head's stage: every type measured at the output
            assert by_type["Q2_K"] > by_type["Q3_K"] > by_type["Q8_0"] >= 0, name


def test_proxy_method_is_refused_for_folder_mixes(tmp_path):
    """ct/gptq's default is the output method; a ct group of routed experts spans every layer, so it has no one layer
    output for the proxy to compare."""
    with pytest.raises(ConfigError, match="--sensitivity-method proxy is for gguf:auto only"):
        api.convert(model_path("tiny-llama"), ["ct:auto"], tmp_path, dry_run=True, sensitivity_method="proxy",
                    budget=Budget.from_options(target_bpw=6.0), sensitivity=tmp_path / "s.json", **MEASURE)


def test_inspect_shows_how_the_mix_spent_its_bits(tmp_path, sensitivity, monkeypatch):
    _never_measure(monkeypatch)
    file, plan = _auto(tmp_path, sensitivity, Budget.from_options(target_bpw=4.0))
    text = CliRunner().invoke(main, ["inspect", str(file)])
    assert text.exit_code == 0, text.output
    assert "(a gguf:auto mix, named after its main type)" in text.output
    assert "auto.budget --target-bpw 4" in text.output and "auto.predicted_kld" in text.output
    report = json.loads(CliRunner().invoke(main, ["inspect", str(file), "--json"]).output)
    assert report["bpw"]["file"] == pytest.approx(plan.bpw, rel=1e-12)
    for layer in report["layers"]:
        planned = [e.scheme for e in plan.entries if e.name.startswith(f"blk.{layer['layer']}.")]
        assert layer["types"] == {t: planned.count(t) for t in set(planned)}
