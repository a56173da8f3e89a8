"""ct:auto: compressed-tensors schemes per vLLM-runnable group, chosen from measured costs to a budget."""

import json

import pytest

from quantkit import convert as api
from quantkit.bundled import model_path
from quantkit.errors import ConfigError
from quantkit.formats.compressed_tensors import runtime_sets
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
        for _, names in runtime_sets(model):
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


def test_impossible_budget_is_refused_before_measuring(tmp_path, monkeypatch):
    monkeypatch.setattr("quantkit.calib.sensitivity.measure", lambda *a, **k: pytest.fail("measured"))
    with pytest.raises(BudgetError, match=r"smallest mix ct:auto can make of this model \(8\.84 bpw"):
        api.convert(model_path("tiny-llama"), ["ct:auto"], tmp_path, budget=Budget.from_options(target_bpw=4.0))


def test_gptq_auto_points_to_ct_auto_gptq():
    with pytest.raises(ConfigError, match="--to ct:auto-gptq"):
        api.convert(model_path("tiny-llama"), ["gptq:auto"], None, dry_run=True,
                    budget=Budget.from_options(target_bpw=9))
