"""Uploading a staging folder to the Hugging Face Hub: the repo made if missing, then every staged file in one
commit, so the repo never shows a card without its files or half a set of shards."""

from __future__ import annotations

from pathlib import Path

from quantkit.errors import PublishError
from quantkit.publish.stage import read_staging
from quantkit.publish.variant import check_repo_id

HUB = "https://huggingface.co"


def hub():
    """huggingface_hub, imported only when publishing: nothing else in quantkit needs it."""
    try:
        import huggingface_hub
    except ImportError:
        raise PublishError("uploading needs huggingface_hub: pip install huggingface_hub (or "
                           "pip install 'quantkit[publish]')") from None
    return huggingface_hub


def resolve_token(token: str | None = None) -> str:
    """`token`, else HF_TOKEN or the login huggingface_hub stored (huggingface_hub.get_token())."""
    token = token or hub().get_token()
    if not token:
        raise PublishError("no Hugging Face token: run `hf auth login` (`huggingface-cli login` before "
                           "huggingface_hub 1.0), set HF_TOKEN, or pass --token")
    return token


def upload(staging_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create `repo_id` (a model repo; kept as it is if it exists) and add every file staged in `staging_dir` in
    one commit. Returns the repo's URL."""
    check_repo_id(repo_id)
    staging_dir = Path(staging_dir)
    manifest, files = read_staging(staging_dir)
    hf = hub()
    from huggingface_hub.errors import HfHubHTTPError

    api = hf.HfApi(token=resolve_token(token))
    operations = [hf.CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(staging_dir / f.path))
                  for f in files]
    try:
        # Only an explicit --private is passed: without it the Hub's default (the owner's setting) applies.
        api.create_repo(repo_id=repo_id, repo_type="model", exist_ok=True, **({"private": True} if private else {}))
        api.create_commit(repo_id=repo_id, repo_type="model", operations=operations,
                          commit_message=f"quantkit publish: {manifest.get('label', repo_id)}")
    except HfHubHTTPError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PublishError(f"the Hub refused the upload to {repo_id}: {first}; check the token's write access "
                           "and the repo id") from None
    except _network_errors() as exc:
        raise PublishError(f"cannot reach the Hub to upload {repo_id} ({exc}); check the network and retry (the "
                           f"staging folder {staging_dir} is kept)") from None
    return f"{HUB}/{repo_id}"


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a dropped connection raises: requests' errors are OSErrors (huggingface_hub < 1.0), httpx's are not."""
    try:
        import httpx
    except ImportError:
        return (OSError,)
    return (OSError, httpx.TransportError)
