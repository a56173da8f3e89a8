"""`quantkit plan` for a catalog model equals llama.cpp's own buffers for the file the plan describes, without the
weights: the plan written as a skeleton GGUF (real tensor table and metadata, a placeholder tokenizer, the data a
sparse hole) and loaded by llama.cpp at a small context (bench/plan_fullscale.py does every catalog model at
1000 to 32768 cells)."""

import pytest

from quantkit import catalog
from quantkit.formats.gguf.file import read_header
from quantkit.formats.gguf.format import model_facts
from quantkit.formats.gguf.mixtures import plan_types
from quantkit.formats.gguf.tensors import mapping_for
from quantkit.formats.gguf.writer import write_skeleton
from quantkit.plan.vram import vram_plan

MiB = 1 << 20
COMPUTE_TOLERANCE = 0.02  # modelled, not the allocator (quantkit.plan.vram._compute_bytes; 1.5B: -0.98% at 4096)


def _plan(model, file_type="Q4_K_M"):
    shapes = {t.name: t.shape for t in mapping_for(model.arch).tensors()}
    return plan_types(shapes, model_facts(model), file_type, imatrix=True)


def test_skeleton_is_the_plan_in_a_sparse_file(tmp_path):
    model = catalog.load("DeepSeek-R1-Distill-Qwen-1.5B")
    plan = _plan(model)
    path = tmp_path / "skeleton.gguf"
    size = write_skeleton(path, model.arch, plan)
    assert path.stat().st_size == size > plan.total_bytes
    assert path.stat().st_blocks * 512 < 16 * MiB  # the header only: 1 GiB of weights take no disk
    header = read_header(path)
    assert {n: t.type.name for n, t in header.tensors.items()} == plan.schemes
    assert sum(t.nbytes for t in header.tensors.values()) == plan.total_bytes
    assert len(header.metadata["tokenizer.ggml.tokens"].value) == model.arch.vocab_size
    assert header.metadata["qwen2.block_count"].value == 28


@pytest.mark.interop
def test_catalog_plan_equals_llama_cpp_buffers(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[test]')")
    from quantkit.testing.llama_cpp_memory import measure_in_subprocess

    model = catalog.load("DeepSeek-R1-Distill-Qwen-1.5B")
    plan = _plan(model)
    path = tmp_path / "skeleton.gguf"
    write_skeleton(path, model.arch, plan)
    contexts = [1000, 4096]
    results = measure_in_subprocess(path, contexts, "f16", timeout=300)
    assert [r["n_ctx"] for r in results] == contexts
    for r in results:
        ours = vram_plan(model.arch, plan, r["n_ctx"], "f16")
        if r["no_populate_shim"]:
            assert r["mapped_resident"] < 16 * MiB, "llama.cpp read the weights' pages"
        # weights: llama_model_size is every tensor's ggml_nbytes, exactly
        assert ours.weights == r["model_size"]
        # the mapped buffer is the file span (tensors padded to 32 bytes), logged with two decimals of MiB
        assert abs(sum(r["model_buffers"].values()) - ours.weights) < 0.01 * MiB
        assert set(r["model_buffers"]) == {"CPU_Mapped"}  # nothing repacked into CPU_REPACK
        # KV: the cell count is exact, the sizes are logged with two decimals of MiB
        assert r["kv_cells"] == -(-r["n_ctx"] // 256) * 256 and r["kv_layers"] == 28
        assert ours.kv_cache == r["kv_cells"] * r["kv_layers"] * 2 * (2 * 128) * 2  # K and V: 2 kv heads x 128, f16
        assert round(ours.kv_cache / MiB, 2) == round((r["k"] + r["v"]) / MiB, 2)
        assert round(ours.kv_cache / MiB, 2) == round(sum(r["kv_buffers"].values()) / MiB, 2)
        compute = sum(r["compute_buffers"].values())
        assert abs(ours.compute - compute) <= COMPUTE_TOLERANCE * compute, (r["n_ctx"], ours.compute, compute)
