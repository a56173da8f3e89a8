"""Upload: one repo creation, one commit holding every staged file; the token and package problems said in one line.
huggingface_hub's HfApi is replaced by a recorder: nothing here touches the network."""

import inspect

import pytest

from quantkit.errors import PublishError
from quantkit.publish import stage, upload

REPO = "alice/tiny-qwen2-Q4_K_M-GGUF"


class FakeHfApi:
    """Records calls, each checked against the installed HfApi's own signature."""

    calls: list = []
    real = None

    def __init__(self, **kwargs):
        inspect.signature(self.real.__init__).bind(self, **kwargs)
        self.calls.append(("init", kwargs))

    def create_repo(self, **kwargs):
        inspect.signature(self.real.create_repo).bind(self, **kwargs)
        self.calls.append(("create_repo", kwargs))

    def create_commit(self, **kwargs):
        inspect.signature(self.real.create_commit).bind(self, **kwargs)
        self.calls.append(("create_commit", kwargs))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    FakeHfApi.calls = []
    FakeHfApi.real = huggingface_hub.HfApi
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    # no stored login or token from the machine running the tests
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    return huggingface_hub


def test_upload_is_one_commit_of_every_staged_file(run, tmp_path, hub):
    out = tmp_path / "s"
    staged = stage(run.variant("Q4_K_M"), out, REPO)
    url = upload(out, REPO, token="hf_test", private=True)
    assert url == f"https://huggingface.co/{REPO}"
    kinds = [kind for kind, _ in FakeHfApi.calls]
    assert kinds == ["init", "create_repo", "create_commit"]
    assert FakeHfApi.calls[0][1]["token"] == "hf_test"
    repo = FakeHfApi.calls[1][1]
    assert repo["repo_id"] == REPO and repo["exist_ok"] is True and repo["private"] is True
    assert repo["repo_type"] == "model"
    commit = FakeHfApi.calls[2][1]
    assert commit["repo_id"] == REPO
    ops = commit["operations"]
    assert all(isinstance(op, hub.CommitOperationAdd) for op in ops)
    assert sorted(op.path_in_repo for op in ops) == sorted(f.path for f in staged)
    for op in ops:
        assert op.path_or_fileobj == str(out / op.path_in_repo)
    assert ".quantkit-publish.json" not in {op.path_in_repo for op in ops}


def test_token_from_the_environment(run, tmp_path, hub, monkeypatch):
    out = tmp_path / "s"
    stage(run.variant("Q8_0"), out, REPO)
    monkeypatch.setattr(hub, "get_token", lambda: "hf_from_env")
    upload(out, REPO)
    assert FakeHfApi.calls[0][1]["token"] == "hf_from_env"
    assert "private" not in FakeHfApi.calls[1][1]  # the owner's default visibility applies


def test_missing_token_is_one_clear_error(run, tmp_path, hub):
    out = tmp_path / "s"
    stage(run.variant("Q8_0"), out, REPO)
    with pytest.raises(PublishError, match="hf auth login.*huggingface-cli login.*HF_TOKEN"):
        upload(out, REPO)
    assert FakeHfApi.calls == []


def test_upload_needs_a_staging_folder(tmp_path, hub):
    with pytest.raises(PublishError, match="not a quantkit staging folder"):
        upload(tmp_path, REPO, token="t")


def test_changed_staged_file_is_refused(run, tmp_path, hub):
    out = tmp_path / "s"
    stage(run.variant("Q8_0"), out, REPO)
    (out / "README.md").write_text("edited")
    with pytest.raises(PublishError, match="changed since it was staged"):
        upload(out, REPO, token="t")


def test_missing_huggingface_hub_is_one_clear_error(run, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name == "huggingface_hub" or name.startswith("huggingface_hub."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    out = tmp_path / "s"
    stage(run.variant("Q8_0"), out, REPO)
    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(PublishError, match="pip install huggingface_hub"):
        upload(out, REPO, token="t")
