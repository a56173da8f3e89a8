"""The VRAM estimate from (architecture, plan, context), before anything is written, equals llama.cpp's own
accounting of the file the plan then produces (quantkit.plan.vram.vram_gguf, itself checked against
llama.cpp's buffers in tests/evaluation/test_vram.py)."""

import pytest

from quantkit import convert as api
from quantkit.model import Model
from quantkit.plan.vram import vram_gguf, vram_plan
from quantkit.source.gguf_file import GGUFFile


@pytest.mark.parametrize(("preset", "kwargs"), [("llama", {}), ("qwen2-tied", {}), ("deepseek_v3", {"fp8": True})])
def test_plan_estimate_equals_the_written_files(model_cache, tmp_path, preset, kwargs):
    folder = model_cache(preset, **kwargs)
    [(path, plan)] = api.convert(folder, ["gguf:Q4_K_M"], tmp_path / "m.gguf")
    with Model(folder) as model:
        gguf = GGUFFile(path)
        for ctx in (100, 512, 3000):
            for kv_type in ("f16", "q8_0"):
                assert vram_plan(model.arch, plan, ctx, kv_type) == vram_gguf(gguf, ctx, kv_type), (ctx, kv_type)
