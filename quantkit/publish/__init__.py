"""`quantkit publish`: a variant of a `quantkit run` made into a Hugging Face repo: model card with the measured
numbers (card), checksums and the artifact staged in a folder (stage, shards), then one commit to the Hub
(upload)."""

from quantkit.publish.card import render_card
from quantkit.publish.stage import DEFAULT_MAX_SHARD_BYTES, StagedFile, read_staging, stage
from quantkit.publish.upload import resolve_token, upload
from quantkit.publish.variant import check_repo_id, default_staging_dir, load_variant

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "StagedFile", "check_repo_id", "default_staging_dir", "load_variant",
           "read_staging", "render_card", "resolve_token", "stage", "upload"]
