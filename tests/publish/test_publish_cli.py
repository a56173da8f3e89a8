"""`quantkit publish`: --dry-run lists exactly what would be uploaded; an upload goes through the library; every
bad input is one `error:` line and exit 2, before anything is staged."""

import json
import shutil

import pytest
from click.testing import CliRunner

from quantkit.cli import main

REPO = "alice/tiny-qwen2-Q4_K_M-GGUF"


def _invoke(*args):
    return CliRunner().invoke(main, ["publish", *map(str, args)])


def _one_error(result, *expected: str) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.output.strip().endswith(errors[0]), result.output
    assert "Traceback" not in result.output
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def test_dry_run_lists_every_file(run, tmp_path):
    out = tmp_path / "s"
    result = _invoke(run.variant("Q4_K_M"), "--repo-id", REPO, "--dry-run", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / ".quantkit-publish.json").read_text())
    lines = result.output.splitlines()
    assert lines[0].startswith(f"would upload {len(manifest['files'])} files")
    listed = [line.split() for line in lines[1:-1]]
    assert listed == [[f["path"], str(f["size"]), f["sha256"]] for f in manifest["files"]]
    assert lines[-1] == f"staged in {out} (dry run: nothing uploaded)"


def test_default_staging_folder_is_in_the_run(run):
    target = run.root / "publish" / "tiny-qwen2-Q8_0"
    try:
        result = _invoke(run.variant("Q8_0"), "--repo-id", REPO, "--dry-run")
        assert result.exit_code == 0, result.output
        assert (target / "tiny-qwen2-Q8_0.gguf").is_file() and (target / "SHA256SUMS").is_file()
    finally:
        shutil.rmtree(run.root / "publish", ignore_errors=True)


def test_upload_through_the_cli(run, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    class Api:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, **kwargs):
            calls.append(("create_repo", kwargs["repo_id"]))

        def create_commit(self, **kwargs):
            calls.append(("create_commit", len(kwargs["operations"])))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    result = _invoke(run.variant("Q8_0"), "--repo-id", REPO, "-o", tmp_path / "s", "--token", "hf_x",
                     "--max-shard-size", "1GB")
    assert result.exit_code == 0, result.output
    assert calls == [("init", "hf_x"), ("create_repo", REPO), ("create_commit", 4)]
    assert f"to https://huggingface.co/{REPO}" in result.output


def test_no_token_fails_before_staging(run, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    _one_error(_invoke(run.variant("Q8_0"), "--repo-id", REPO, "-o", tmp_path / "s"), "hf auth login", "HF_TOKEN")
    assert not (tmp_path / "s").exists()


def _broken_copy(run, tmp_path, variant="Q8_0"):
    """A copy of the run holding one variant, to break."""
    root = tmp_path / "run"
    (root / "tiny-qwen2").mkdir(parents=True)
    shutil.copytree(run.variant(variant), root / "tiny-qwen2" / variant)
    shutil.copytree(run.root / "tiny-qwen2" / "eval", root / "tiny-qwen2" / "eval")
    return root / "tiny-qwen2" / variant


def test_bad_repo_id(run, tmp_path):
    for bad in ("no-slash", "a/b/c", "a/-b", "a/b..c", "/b"):
        _one_error(_invoke(run.variant("Q8_0"), "--repo-id", bad, "--dry-run", "-o", tmp_path / "s"),
                   "not a Hugging Face repo id")
    assert not (tmp_path / "s").exists()


def test_not_a_variant_dir(tmp_path):
    _one_error(_invoke(tmp_path, "--repo-id", REPO, "--dry-run"), "no variant.json", "quantkit run")
    _one_error(_invoke(tmp_path / "nope", "--repo-id", REPO, "--dry-run"), "no such variant directory")


def test_variant_json_missing_keys(run, tmp_path):
    variant = _broken_copy(run, tmp_path)
    info = json.loads((variant / "variant.json").read_text())
    del info["artifact"], info["eval_ctx"]
    (variant / "variant.json").write_text(json.dumps(info))
    _one_error(_invoke(variant, "--repo-id", REPO, "--dry-run"), "lacks artifact, eval_ctx")


def test_missing_artifact(run, tmp_path):
    variant = _broken_copy(run, tmp_path)
    (variant / "tiny-qwen2-Q8_0.gguf").unlink()
    _one_error(_invoke(variant, "--repo-id", REPO, "--dry-run"), "tiny-qwen2-Q8_0.gguf", "not found")


def test_missing_eval_report(run, tmp_path):
    variant = _broken_copy(run, tmp_path)
    (variant.parent / "eval" / "report.json").unlink()
    _one_error(_invoke(variant, "--repo-id", REPO, "--dry-run"), "no eval report", "quantkit eval")
    assert not (variant.parent.parent / "publish").exists()


def test_report_without_the_variant(run, tmp_path):
    variant = _broken_copy(run, tmp_path)
    report_path = variant.parent / "eval" / "report.json"
    report = json.loads(report_path.read_text())
    report["variants"] = [r for r in report["variants"] if r["name"] != "tiny-qwen2-Q8_0"]
    report_path.write_text(json.dumps(report))
    _one_error(_invoke(variant, "--repo-id", REPO, "--dry-run"), "no row for tiny-qwen2-Q8_0")


def test_staging_folder_holding_other_files(run, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_error(_invoke(run.variant("Q8_0"), "--repo-id", REPO, "--dry-run", "-o", out), "not empty")
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_shard_size(run, tmp_path):
    _one_error(_invoke(run.variant("Q8_0"), "--repo-id", REPO, "--dry-run", "-o", tmp_path / "s",
                       "--max-shard-size", "lots"), "cannot read the size")
    _one_error(_invoke(run.variant("Q8_0"), "--repo-id", REPO, "--dry-run", "-o", tmp_path / "s",
                       "--max-shard-size", "60GB"), "over 50 GB")
