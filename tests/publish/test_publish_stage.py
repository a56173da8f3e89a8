"""Staging: the repo's exact files with checksums that hold, hard links where possible, a GGUF over the shard limit
re-split into shards llama.cpp loads with the same logits, and a staging folder that is never half-made."""

import hashlib
import json
import shutil

import pytest

from quantkit.errors import PublishError
from quantkit.formats.gguf.file import read_header
from quantkit.publish import read_staging, stage
from quantkit.publish.shards import resplit_gguf

REPO = "alice/tiny-qwen2-GGUF"


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_staged_gguf_files_and_checksums(run, tmp_path):
    out = tmp_path / "staging"
    staged = stage(run.variant("Q4_K_M"), out, REPO)
    names = [f.path for f in staged]
    assert names == sorted(["README.md", "SHA256SUMS", "quality_vs_vram.png", "tiny-qwen2-Q4_K_M.gguf"])
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert on_disk == sorted([*names, ".quantkit-publish.json"])
    sums = {}
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, path = line.split("  ", 1)
        sums[path] = digest
    assert set(sums) == set(names) - {"SHA256SUMS"}
    for f in staged:
        assert f.sha256 == _sha256(out / f.path) and f.size == (out / f.path).stat().st_size
        if f.path != "SHA256SUMS":
            assert sums[f.path] == f.sha256
    # same file system: the artifact is a hard link, not a copy
    artifact = run.variant("Q4_K_M") / "tiny-qwen2-Q4_K_M.gguf"
    assert (out / artifact.name).stat().st_ino == artifact.stat().st_ino
    plot = run.root / "tiny-qwen2" / "eval" / "quality_vs_vram.png"
    assert (out / "quality_vs_vram.png").read_bytes() == plot.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name != "staging"]  # no temporary folder left behind
    manifest, files = read_staging(out)
    assert files == staged and manifest["repo_id"] == REPO


def test_staged_hf_folder_is_the_repo_root(run, tmp_path):
    staged = stage(run.variant("ct-w4g128"), tmp_path / "s", "alice/tiny-qwen2-ct")
    names = {f.path for f in staged}
    assert {"config.json", "README.md", "SHA256SUMS", "quality_vs_vram.png"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    assert all("/" not in n for n in names), names


def test_restaging_the_same_variant_replaces_it(run, tmp_path):
    out = tmp_path / "s"
    stage(run.variant("Q8_0"), out, REPO)
    (out / "README.md").unlink()  # hard links are removed, never written through
    again = stage(run.variant("Q8_0"), out, "alice/other")
    assert "alice/other" in (out / "README.md").read_text()
    assert json.loads((out / ".quantkit-publish.json").read_text())["repo_id"] == "alice/other"
    assert [f.path for f in again] == [f.path for f in read_staging(out)[1]]
    assert (run.variant("Q8_0") / "tiny-qwen2-Q8_0.gguf").is_file()


def test_staging_refuses_a_folder_holding_something_else(run, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PublishError, match="not empty and not a staging of"):
        stage(run.variant("Q8_0"), out, REPO)
    assert (out / "notes.txt").read_text() == "mine"
    shutil.rmtree(out)
    stage(run.variant("Q8_0"), out, REPO)
    with pytest.raises(PublishError, match="not a staging of"):
        stage(run.variant("Q4_K_M"), out, REPO)
    (out / "extra.bin").write_bytes(b"x")
    with pytest.raises(PublishError, match="extra.bin"):
        stage(run.variant("Q8_0"), out, REPO)


def test_small_max_shard_resplits_into_shards_llama_cpp_loads(run, tmp_path):
    source = run.variant("Q8_0") / "tiny-qwen2-Q8_0.gguf"
    limit = source.stat().st_size // 3
    staged = stage(run.variant("Q8_0"), tmp_path / "s", REPO, max_shard_bytes=limit)
    shards = sorted(f.path for f in staged if f.path.endswith(".gguf"))
    count = len(shards)
    assert count >= 3
    assert shards == [f"tiny-qwen2-Q8_0-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    original = read_header(source)
    tables = [read_header(tmp_path / "s" / name) for name in shards]
    assert [n for t in tables for n in t.tensors] == list(original.tensors)
    for table in tables:
        assert sum(t.nbytes for t in table.tensors.values()) <= limit
        assert table.metadata["split.count"].value == count
    # the model's metadata travels in the first shard, unchanged
    first = {k: v for k, v in tables[0].metadata.items() if not k.startswith("split.")}
    assert first == original.metadata
    card = (tmp_path / "s" / "README.md").read_text()
    assert f"llama-server -m tiny-qwen2-GGUF/{shards[0]}" in card

    pytest.importorskip("llama_cpp")
    import numpy as np

    from quantkit.evaluation.llama_cpp_guard import open_llama

    ids = [1, 17, 300, 42, 2047, 5, 999, 64]
    logits = []
    for path in (source, tmp_path / "s" / shards[0]):
        llm = open_llama(path, n_ctx=32, n_batch=32, n_threads=2, logits_all=True, verbose=False)
        llm.eval(ids)
        logits.append(np.array(llm.scores[:len(ids)], dtype=np.float32))
        llm.close()
    assert np.array_equal(logits[0], logits[1])


def test_resplit_of_shards_joins_and_resplits(run, tmp_path):
    source = run.variant("Q4_K_M") / "tiny-qwen2-Q4_K_M.gguf"
    size = source.stat().st_size
    shards = resplit_gguf([source], tmp_path / "a" / "m.gguf", size // 4)
    assert len(shards) >= 4
    joined = resplit_gguf(shards, tmp_path / "b" / "m.gguf", size)
    assert [p.name for p in joined] == ["m.gguf"]
    assert joined[0].read_bytes() == source.read_bytes()  # same writer, same table: the original's bytes
    with pytest.raises(PublishError, match="not shard 1 of 2"):
        resplit_gguf([shards[1], shards[0]], tmp_path / "c" / "m.gguf", size)
    with pytest.raises(PublishError, match="cannot be split"):
        resplit_gguf([source], tmp_path / "d" / "m.gguf", 1000)
    assert not list((tmp_path / "d").glob("*"))


def test_gguf_split_artifact_is_staged_as_is(run, tmp_path):
    """A variant written as gguf-split shards (convert --split-max-size) keeps them when each is under the limit;
    the card's VRAM counts the tensors of every shard."""
    from quantkit.publish import render_card

    model = tmp_path / "run" / "tiny-qwen2"
    variant = model / "Q8_0"
    variant.mkdir(parents=True)
    shutil.copytree(run.root / "tiny-qwen2" / "eval", model / "eval")
    whole = run.variant("Q8_0") / "tiny-qwen2-Q8_0.gguf"
    shards = resplit_gguf([whole], variant / "tiny-qwen2-Q8_0.gguf", whole.stat().st_size // 2)
    info = json.loads((run.variant("Q8_0") / "variant.json").read_text())
    info.update(artifact=shards[0].name, files=[p.name for p in shards])
    (variant / "variant.json").write_text(json.dumps(info))
    report = json.loads((model / "eval" / "report.json").read_text())
    for row in report["variants"]:
        if row["name"] == "tiny-qwen2-Q8_0":
            row["name"] = shards[0].stem  # what `quantkit eval` names a set of shards: its first file
    (model / "eval" / "report.json").write_text(json.dumps(report))

    staged = stage(variant, tmp_path / "s", REPO)
    names = [f.path for f in staged if f.path.endswith(".gguf")]
    assert names == [p.name for p in shards]
    assert all((tmp_path / "s" / n).stat().st_ino == (variant / n).stat().st_ino for n in names)
    def vram(card: str) -> str:
        return card.split("## VRAM")[1].split("## Usage")[0]

    assert vram(render_card(variant, REPO)) == vram(render_card(run.variant("Q8_0"), REPO))
