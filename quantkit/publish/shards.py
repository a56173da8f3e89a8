"""Re-splitting a finished GGUF (one file or gguf-split shards) into shards of at most a given data size, by
copying each tensor's stored bytes: nothing is decoded or re-encoded, and memory stays at one copy chunk."""

from __future__ import annotations

from pathlib import Path

from quantkit.errors import PublishError
from quantkit.formats.gguf.file import GGUFWriter, TensorEntry, read_header

COPY_CHUNK = 64 << 20
# Keys that describe the old layout, not the model: the writer sets split.* per shard, and it pads to its own
# alignment (it never writes general.alignment), so a copied general.alignment would misplace every tensor.
_LAYOUT_KEYS = ("general.alignment",)


def resplit_gguf(sources: list[Path], dest: Path, max_shard_bytes: int) -> list[Path]:
    """Write the GGUF stored in `sources` (one file, or its gguf-split shards in order) as `dest` when it fits in
    one shard, else as llama.cpp-loadable shards `<dest stem>-00001-of-0000N.gguf`, each holding at most
    `max_shard_bytes` of tensor data (as gguf-split --split-max-size: a tensor never spans two shards; each file
    adds its header). Returns the written paths; all are `.part` until the last tensor is copied."""
    headers = [read_header(p) for p in sources]
    count = len(headers)
    for index, (path, header) in enumerate(zip(sources, headers, strict=True)):
        no = header.metadata.get("split.no")
        split_count = header.metadata.get("split.count")
        if count > 1 and (no is None or no.value != index or split_count is None or split_count.value != count):
            raise PublishError(f"{path}: not shard {index + 1} of {count} of one gguf-split file; list the shards "
                               "of one model, in order, in variant.json's files")
    metadata = {k: v for k, v in headers[0].metadata.items() if not k.startswith("split.") and k not in _LAYOUT_KEYS}
    stored = [(path, t) for path, header in zip(sources, headers, strict=True) for t in header.tensors.values()]
    too_big = [t for _, t in stored if t.nbytes > max_shard_bytes]
    if too_big:
        t = too_big[0]
        raise PublishError(f"tensor {t.name} alone holds {t.nbytes} bytes, more than the {max_shard_bytes}-byte "
                           "shard limit (a tensor cannot be split); raise --max-shard-size")
    entries = [TensorEntry(t.name, t.shape, t.type) for _, t in stored]
    with GGUFWriter(dest, metadata, entries, split_max_bytes=max_shard_bytes) as writer:
        handles = {}
        try:
            for path, t in stored:
                f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
                f.seek(t.offset)
                left = t.nbytes
                while left:
                    piece = f.read(min(left, COPY_CHUNK))
                    if not piece:
                        raise PublishError(f"{path}: ends inside tensor {t.name}; the file is truncated: "
                                           "convert it again")
                    writer.write(t.name, piece)
                    left -= len(piece)
        finally:
            for f in handles.values():
                f.close()
        paths = writer.finish()
    _check_copy(paths, entries)
    return paths


def _check_copy(paths: list[Path], entries: list[TensorEntry]) -> None:
    """The written table read back: every tensor once, in order, with its type and shape."""
    written = [TensorEntry(t.name, t.shape, t.type) for p in paths for t in read_header(p).tensors.values()]
    if written != entries:
        raise PublishError(f"{paths[0]}: the re-split files do not hold the source's tensor table; remove them and "
                           "report this as a quantkit bug")
