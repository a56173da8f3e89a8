"""The Hugging Face model folder that GPTQ, AWQ and compressed-tensors outputs share: sharded safetensors with
an index, config.json, the tokenizer files.

Everything is written into `OUT.part/` first: one shard per decoder layer plus one for the tensors outside the
layers, each written atomically and recorded (with its sha256) in a small state file, so a killed run resumes
after the last finished layer. `finish()` renames the shards to HF's `model-0000k-of-0000n.safetensors`, writes
the index and the JSON files, moves `OUT.part` to `OUT` and re-reads the folder. Same inputs give byte-identical
files: safetensors orders its header itself, and nothing here writes a time or a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from quantkit.errors import QuantkitError
from quantkit.source.hf import INDEX_NAME
from quantkit.source.safetensors_file import SafetensorsFile

STATE_NAME = "quantkit-state.json"
OTHER = "other"  # the shard key of the tensors outside the decoder layers
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")
_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int32: "I32",
                torch.int64: "I64"}


class OutputFolderError(QuantkitError):
    """An output folder cannot be written where asked, or holds something else."""


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def _shard_name(key: str) -> str:
    return f"{OTHER}.safetensors" if key == OTHER else f"layer-{int(key):05d}.safetensors"


class FolderWriter:
    """One output folder in the making. `fingerprint` identifies the command (target, source files, settings): an
    existing OUT.part is resumed only when it was made by the same one."""

    def __init__(self, out: Path, source_folder: Path, fingerprint: str, num_layers: int, *, force: bool = False):
        self.out, self.source_folder, self.num_layers = Path(out), Path(source_folder), num_layers
        self.part = self.out.with_name(self.out.name + ".part")
        self.fingerprint, self.force = fingerprint, force
        if self.out.exists() and not force:
            raise OutputFolderError(f"{self.out}: the output already exists; remove it, choose another -o, or pass "
                                    "--force to replace it (replaced only once the new one is complete)")
        try:
            self.part.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputFolderError(f"{self.part}: cannot create the output folder ({exc.strerror}); choose a "
                                    "writable location with -o") from None
        self.shards: dict[str, dict] = self._load_state()
        self._save_state()

    # ---- state -----------------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, dict]:
        path = self.part / STATE_NAME
        if not path.is_file():
            if any(self.part.iterdir()):
                raise OutputFolderError(f"{self.part}: holds files but no {STATE_NAME}, so it is not a quantkit run "
                                        "in progress; remove it or choose another -o")
            return {}
        try:
            state = json.loads(path.read_text())
            fingerprint, shards = state["fingerprint"], dict(state["shards"])
        except (ValueError, KeyError, TypeError):
            fingerprint, shards = None, {}
        if fingerprint != self.fingerprint:
            raise OutputFolderError(f"{self.part}: OUT.part holds a run of a different command; remove it or rerun "
                                    "the same command")
        # A shard whose bytes no longer match its record (truncated by a kill, damaged) is redone, and with it
        # every later layer: layers are produced in order, each from the previous one's quantized output.
        valid = {}
        if OTHER in shards and _sha256(self.part / _shard_name(OTHER)) == shards[OTHER]["sha256"]:
            valid[OTHER] = shards[OTHER]
        for layer in range(self.num_layers):
            record = shards.get(str(layer))
            if record is None or _sha256(self.part / _shard_name(str(layer))) != record["sha256"]:
                break
            valid[str(layer)] = record
        return valid

    def _save_state(self) -> None:
        data = json.dumps({"fingerprint": self.fingerprint, "shards": self.shards}, indent=1, sort_keys=True)
        tmp = self.part / (STATE_NAME + ".tmp")
        tmp.write_text(data + "\n")
        os.replace(tmp, self.part / STATE_NAME)

    # ---- shards ----------------------------------------------------------------------------------------
    @property
    def start_layer(self) -> int:
        """The first decoder layer still to write."""
        return sum(1 for key in self.shards if key != OTHER)

    def has(self, key: int | str) -> bool:
        return str(key) in self.shards

    def write(self, key: int | str, tensors: dict[str, torch.Tensor], info: dict | None = None) -> None:
        """Write one shard (a layer index, or OTHER) and record it, with `info` (JSON facts about it that the
        finished folder reports, kept across a resume); the shard file appears only when complete."""
        key = str(key)
        if key != OTHER and int(key) != self.start_layer:
            raise ValueError(f"layer {key} written out of order (next is {self.start_layer})")
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in sorted(tensors.items())}
        data = safetensors_bytes(tensors, metadata={"format": "pt"})
        path = self.part / _shard_name(key)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            raise OutputFolderError(f"{path}: cannot write the shard ({exc.strerror}); free some space or choose "
                                    "another -o, then rerun the same command to resume") from None
        self.shards[key] = {"sha256": hashlib.sha256(data).hexdigest(),
                            "nbytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                            "tensors": {n: [_DTYPE_NAMES[t.dtype], list(t.shape)] for n, t in tensors.items()},
                            # as the state file will give it back to a resumed run (keys sorted)
                            **({"info": json.loads(json.dumps(info, sort_keys=True))} if info else {})}
        self._save_state()

    def infos(self) -> dict[int, dict]:
        """Every written layer's info, by layer."""
        return {int(k): r["info"] for k, r in self.shards.items() if k != OTHER and "info" in r}

    def read(self, key: int | str) -> dict[str, torch.Tensor]:
        """A finished shard's tensors, as stored."""
        file = SafetensorsFile(self.part / _shard_name(str(key)))
        try:
            return {name: file.read(name) for name in file.entries}
        finally:
            file.close()

    # ---- completion ------------------------------------------------------------------------------------
    def finish(self, config_json: dict, extra_json_files: dict[str, dict]) -> list[Path]:
        """Complete the folder: shards renamed in order (non-layer tensors first), the index, config.json (the
        source's, its quantization_config replaced by what `config_json` adds), `extra_json_files`, the
        tokenizer files; then OUT.part becomes OUT and is re-read. Returns the shard paths."""
        missing = [k for k in [OTHER, *map(str, range(self.num_layers))] if k not in self.shards]
        if missing:
            raise ValueError(f"{self.part}: shards {missing[:5]} were never written")
        keys = [OTHER, *map(str, range(self.num_layers))]
        n = len(keys)
        names = {key: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, key in enumerate(keys)}
        weight_map, total = {}, 0
        for key in keys:
            weight_map.update(dict.fromkeys(self.shards[key]["tensors"], names[key]))
            total += self.shards[key]["nbytes"]
        _write_json(self.part / INDEX_NAME, {"metadata": {"total_size": total},
                                             "weight_map": dict(sorted(weight_map.items()))})
        _write_json(self.part / "config.json", self._config(config_json))
        for name, data in extra_json_files.items():
            _write_json(self.part / name, data)
        self._copy_tokenizer()
        for key in keys:
            os.replace(self.part / _shard_name(key), self.part / names[key])
        (self.part / STATE_NAME).unlink()
        self._move_into_place()
        self._verify(names)
        return [self.out / names[key] for key in keys]

    def _config(self, additions: dict) -> dict:
        config = json.loads((self.source_folder / "config.json").read_text())
        config.pop("quantization_config", None)  # the source's (e.g. FP8): the reader decoded it already
        config.update(additions)
        # transformers 4.x reads only top-level rope_theta/rope_scaling and silently falls back to the class
        # default without them (PEERS.md §7 pitfall 1); v5 writes rope_parameters alone.
        rope = config.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            config.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", "default") != "default":
                config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        return config

    def _copy_tokenizer(self) -> None:
        for name in TOKENIZER_FILES:
            src = self.source_folder / name
            if not src.is_file():
                continue
            if name == "tokenizer.json":
                _write_tokenizer_json(src, self.part / name)
            else:
                shutil.copyfile(src, self.part / name)

    def _move_into_place(self) -> None:
        old = self.out.with_name(self.out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)  # left by a run killed during this swap
        if self.out.exists():  # force: the complete new folder replaces the old one only now
            os.replace(self.out, old)
        os.replace(self.part, self.out)
        shutil.rmtree(old, ignore_errors=True)

    def _verify(self, names: dict[str, str]) -> None:
        index = json.loads((self.out / INDEX_NAME).read_text())["weight_map"]
        for key, file_name in names.items():
            file = SafetensorsFile(self.out / file_name)
            try:
                found = {n: [e.dtype, list(e.shape)] for n, e in file.entries.items()}
            finally:
                file.close()
            expected = self.shards[key]["tensors"]
            if found != expected or any(index.get(n) != file_name for n in expected):
                raise QuantkitError(f"{self.out / file_name}: re-reading the written shard does not give the "
                                    "tensors written (disk full or a concurrent writer?); run the command again")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_tokenizer_json(src: Path, dst: Path) -> None:
    """Copy tokenizer.json, with BPE merges as "a b" strings where that is lossless: tokenizers < 0.20 (what
    transformers 4.x consumers run) rejects the [a, b] pairs newer versions write (PEERS.md §7 pitfall 1)."""
    text = src.read_text(encoding="utf-8")
    data = json.loads(text)
    merges = (data.get("model") or {}).get("merges")
    pairs = isinstance(merges, list) and merges and all(isinstance(m, list) and len(m) == 2 for m in merges)
    if pairs and not any(" " in a or " " in b for a, b in merges):
        data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    dst.write_text(text, encoding="utf-8")
