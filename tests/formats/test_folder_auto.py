"""ct:auto and gptq:auto: HF-folder schemes per runtime-runnable group, chosen from measured costs to a budget."""

import json

import pytest

from quantkit import convert as api
from quantkit.bundled import model_path
from quantkit.formats.compressed_tensors import FORMAT as CT
from quantkit.formats.gptq import FORMAT as GPTQ_FORMAT
from quantkit.formats.gptq import dynamic_override
from quantkit.model import Model
from quantkit.plan.allocate import Budget, BudgetError

MEASURE = dict(sensitivity_samples=2, calib_ctx=128)


@pytest.fixture(scope="module")
def sensitivity(tmp_path_factory):
    return tmp_path_factory.mktemp("sens") / "ct.sensitivity.json"


@pytest.mark.parametrize("name, bpw", [("tiny-llama", 9.5), ("tiny-deepseek", 7.5)])
def test_budget_met_with_runtime_sets_kept_whole(tmp_path, name, bpw):
    [(folder, plan)] = api.convert(model_path(name), ["ct:auto"], tmp_path, budget=Budget.from_options(target_bpw=bpw),
                                   sensitivity=tmp_path / "s.json", **MEASURE)
    assert folder.name == f"{name}-CT-auto-{bpw:.2f}bpw"
    assert bpw - 0.6 < plan.bpw <= bpw
    auto = {e.name: e.scheme for e in plan.entries if e.note == "auto"}
    assert len(set(auto.values())) > 1  # a real mix at a budget between the extremes
    with Model(model_path(name)) as model:
        for _, names in CT.runtime_sets(model):
            assert len({plan.schemes[n] for n in names}) == 1
    report = json.loads((folder / "quantkit_report.json").read_text())
    assert report["auto"]["budget"] == f"--target-bpw {bpw:g}" and report["auto"]["predicted_kld"] > 0
    assert report["auto"]["schemes"] == auto
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == len({s for s in auto.values() if s != "bf16"})
    with Model(folder) as written:  # quantkit reads its own output back
        assert written.forward(__import__("torch").arange(3, 40))[0].isfinite().all()


def test_auto_gptq_chooses_from_gptq_s_own_costs(tmp_path, sensitivity):
    """ct:auto-gptq measures every candidate as GPTQ writes it (its own measurement, not ct:auto's), so the costs
    it chooses from are lower than round-to-nearest's at the same scheme."""
    budget = Budget.from_options(target_bpw=9.5)
    stores = {"ct:auto": sensitivity, "ct:auto-gptq": tmp_path / "gptq.sensitivity.json"}
    plans = {spec: api.convert(model_path("tiny-llama"), [spec], tmp_path, budget=budget, sensitivity=store,
                               dry_run=True, **MEASURE)[0][1] for spec, store in stores.items()}
    assert all(e.scheme.endswith("-gptq") for e in plans["ct:auto-gptq"].entries if e.note == "auto"
               and e.scheme != "bf16")
    rtn, gptq = (json.loads(p.read_text()) for p in stores.values())
    assert rtn["key"] != gptq["key"]
    costs = [{(g["name"], c["scheme"]): c["kld"] for g in m["groups"] for c in g["candidates"]} for m in (rtn, gptq)]
    assert costs[0].keys() == costs[1].keys()
    low_bits = [k for k in costs[0] if k[1].startswith("w4")]
    assert sum(costs[1][k] for k in low_bits) < 0.8 * sum(costs[0][k] for k in low_bits)


def test_auto_gptq_act_measures_and_writes_act_order_gptq(tmp_path):
    """ct:auto-gptq-act: every candidate is measured and written as act-order GPTQ with static groups (actorder
    "weight", llm-compressor's GPTQ default), a measurement of its own: ct:auto-gptq's stored one is not reused."""
    budget, calib = Budget.from_options(target_bpw=9.5), dict(MEASURE, calib_samples=16)
    store = tmp_path / "gptq.sensitivity.json"
    api.convert(model_path("tiny-llama"), ["ct:auto-gptq"], tmp_path, budget=budget, sensitivity=store, dry_run=True,
                **calib)
    plain = json.loads(store.read_text())
    [(folder, plan)] = api.convert(model_path("tiny-llama"), ["ct:auto-gptq-act"], tmp_path, budget=budget,
                                   sensitivity=store, **calib)
    act = json.loads(store.read_text())
    assert act["key"] != plain["key"]
    assert {g["name"] for g in act["groups"]} == {g["name"] for g in plain["groups"]}
    assert folder.name == "tiny-llama-CT-auto-gptq-act-9.50bpw"
    assert all(e.scheme.endswith("-gptq-act") for e in plan.entries if e.note == "auto" and e.scheme != "bf16")
    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]
    assert groups and all(g["weights"]["actorder"] == "weight" for g in groups.values())


def test_auto_gptq_measures_experts_of_every_layer_from_their_own_layer(tmp_path):
    """ct:auto-gptq on MoE: the routed experts of all layers are one group (measured where the first of them is),
    each expert GPTQ-encoded from the Hessian of its own layer's float inputs."""
    store = tmp_path / "s.json"
    [(_, plan)] = api.convert(model_path("tiny-deepseek"), ["ct:auto-gptq"], tmp_path, dry_run=True,
                              budget=Budget.from_options(target_bpw=7.0), sensitivity=store, **MEASURE)
    [experts] = [g for g in json.loads(store.read_text())["groups"] if "linears)" in g["name"] and
                 "experts" in g["name"] and "shared" not in g["name"]]
    assert experts["name"].endswith("(48 linears)")
    costs = {c["scheme"]: c["kld"] for c in experts["candidates"]}
    assert 0 < costs["w8"] < costs["w4g32"] < costs["w4"]
    assert len({plan.schemes[n] for n in plan.schemes if ".experts." in n}) == 1


@pytest.mark.parametrize("spec, floor", [("ct:auto", "8.84"), ("gptq:auto", "8.36")])
def test_impossible_budget_is_refused_before_measuring(tmp_path, monkeypatch, spec, floor):
    """The floor: every linear at its smallest candidate (gptq: w3g128), the rest BF16."""
    monkeypatch.setattr("quantkit.calib.sensitivity.measure", lambda *a, **k: pytest.fail("measured"))
    with pytest.raises(BudgetError, match=rf"smallest mix {spec} can make of this model \({floor} bpw"):
        api.convert(model_path("tiny-llama"), [spec], tmp_path, budget=Budget.from_options(target_bpw=4.0))


@pytest.mark.parametrize("name, bpw", [("tiny-llama", 9.5), ("tiny-deepseek", 7.5)])
def test_gptq_auto_writes_its_mix_as_gptqmodel_dynamic(tmp_path, name, bpw):
    """gptq:auto: GPTQ-measured costs, the budget met, vLLM's sets (a layer's routed experts) kept whole, and the
    folder's `dynamic` giving every linear the scheme the plan chose; quantkit reads the mix back."""
    budget = Budget.from_options(target_bpw=bpw)
    [(folder, plan)] = api.convert(model_path(name), ["gptq:auto"], tmp_path, budget=budget,
                                   sensitivity=tmp_path / "s.json", **MEASURE)
    assert folder.name == f"{name}-GPTQ-auto-{bpw:.2f}bpw"
    assert bpw - 0.6 < plan.bpw <= bpw
    auto = {e.name: e.scheme for e in plan.entries if e.note == "auto"}
    assert len(set(auto.values())) > 1
    with Model(model_path(name)) as model:
        sets = GPTQ_FORMAT.runtime_sets(model)
    assert all(len({plan.schemes[n] for n in names}) == 1 for _, names in sets)
    if name == "tiny-deepseek":  # per layer, not across layers as in compressed-tensors
        assert [len(names) for rule, names in sets if rule.startswith("MoE")] == [24, 24]
    assert json.loads((tmp_path / "s.json").read_text())["key"]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    top = f"w{config['bits']}g{config['group_size']}" if config["group_size"] != -1 else f"w{config['bits']}"
    for weight, scheme in auto.items():
        override = dynamic_override(config.get("dynamic"), weight.removesuffix(".weight"))
        if override is False:
            assert scheme == "bf16"
        else:
            own = override or {"bits": config["bits"], "group_size": config["group_size"]}
            assert scheme == f"w{own['bits']}" + (f"g{own['group_size']}" if own["group_size"] != -1 else ""), weight
    assert top in auto.values()
    report = json.loads((folder / "quantkit_report.json").read_text())
    assert report["auto"]["schemes"] == auto and report["auto"]["predicted_kld"] > 0
    with Model(folder) as written:
        assert written.forward(__import__("torch").arange(3, 40))[0].isfinite().all()
