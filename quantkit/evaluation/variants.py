"""What `quantkit eval` scores: any artifact quantkit reads, behind one interface (logits for token ids, size,
VRAM), on one of two backends.

- torch: quantkit's layer-by-layer reference forward on the (dequantized) weights: HF folders (BF16/F16/F32
  or DeepSeek block-FP8) and GGUF files (decoded with quantkit's codecs; the architecture comes from the
  baseline's HF config, as a GGUF made from that checkpoint describes the same model).
- llama.cpp: llama-cpp-python on a GGUF file, i.e. exactly what a llama.cpp user gets.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from quantkit.arch import Architecture, load_architecture
from quantkit.errors import ConfigError, QuantkitError
from quantkit.evaluation.llama_cpp_guard import open_llama
from quantkit.formats.gguf.tensors import mapping_for
from quantkit.model import Model
from quantkit.plan import bits_per_weight
from quantkit.plan.vram import VramEstimate, vram_checkpoint, vram_gguf
from quantkit.source.gguf_file import GGUFFile

BACKENDS = ("auto", "torch", "llama.cpp")
_CACHE_LIMIT_BYTES = 4 << 30  # float32 weights kept in memory between forwards up to this size


class Variant:
    name: str
    path: Path
    format: str  # "hf" | "gguf"
    type: str  # llama.cpp file type name for GGUF, the stored dtype for HF folders
    backend: str
    vocab_size: int
    max_context: int | None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """[batch, T] token ids -> float32 [batch, T, vocab] next-token logits (CPU)."""
        raise NotImplementedError

    def tokens(self) -> list[str] | None:
        """The vocabulary's token strings, where the artifact carries them (to check they match)."""
        return None

    def choice_logprobs(self, context: list[int], choices: list[list[int]]) -> list[float]:
        """Log-likelihood of each choice's tokens after the context. The choices go in one right-padded batch:
        with causal attention, padding after a sequence never changes its logits."""
        longest = max(len(context) + len(c) for c in choices)
        batch = torch.zeros(len(choices), longest, dtype=torch.long)
        for row, choice in enumerate(choices):
            batch[row, : len(context) + len(choice)] = torch.tensor(context + choice)
        logprobs = torch.log_softmax(self.logits(batch), dim=-1)
        start = len(context)
        return [float(logprobs[row, start - 1:start - 1 + len(c)].gather(-1, torch.tensor(c)[:, None]).sum())
                for row, c in enumerate(choices)]

    def size_bytes(self) -> int:
        raise NotImplementedError

    def bpw(self) -> float:
        raise NotImplementedError

    def vram(self, ctx: int) -> VramEstimate:
        raise NotImplementedError

    def measured_peak(self) -> int | None:
        """Peak GPU bytes this variant's own forwards held, when it ran on CUDA."""
        return None

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path), "format": self.format, "type": self.type,
                "backend": self.backend}


class _CachedWeights:
    """Dequantized float32 weights kept between forwards while they fit `limit` bytes; past it, read again
    each time (the forward asks for one layer's tensors at a time, so memory stays bounded)."""

    def __init__(self, read, device: torch.device, limit: int = _CACHE_LIMIT_BYTES):
        self.read, self.device, self.limit, self.used = read, device, limit, 0
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        if name in self.cache:
            return self.cache[name]
        tensor = self.read(name).to(self.device)
        if self.used + tensor.numel() * 4 <= self.limit:
            self.cache[name] = tensor
            self.used += tensor.numel() * 4
        return tensor


def _finite(read, where: Path):
    """`read` that refuses a weight holding NaN/Inf: it would turn every metric into NaN (and a report row into
    nothing), so the variant is refused naming the tensor, as convert refuses it."""

    def checked(name: str) -> torch.Tensor:
        tensor = read(name)
        if not torch.isfinite(torch.stack(torch.aminmax(tensor.float()))).all():  # NaN propagates into min/max
            bad = int((~torch.isfinite(tensor)).sum())
            raise QuantkitError(f"{where}: tensor {name} has {bad} NaN/Inf value(s); the weights are corrupt (or "
                                "saved from a diverged run) and cannot be evaluated")
        return tensor

    return checked


class _TorchForward:
    """The reference forward on cached weights; on CUDA it also tracks this variant's peak: its cached weights
    plus the most any one forward allocated on top of what was resident before it (other variants share the
    device in lockstep, so the device-wide peak would not be this variant's)."""

    arch: Architecture
    weights: _CachedWeights
    device: torch.device
    _peak: int | None = None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.device.type != "cuda":
                return self.arch.forward(self.weights, ids.to(self.device)).float().cpu()
            resident, cached = torch.cuda.memory_allocated(self.device), self.weights.used
            torch.cuda.reset_peak_memory_stats(self.device)
            logits = self.arch.forward(self.weights, ids.to(self.device)).float()
            peak = torch.cuda.max_memory_allocated(self.device) - resident + cached
            self._peak = max(self._peak or 0, peak)
            return logits.cpu()

    def measured_peak(self) -> int | None:
        return self._peak


class HFVariant(_TorchForward, Variant):
    format, backend = "hf", "torch"

    def __init__(self, model: Model, name: str | None = None):
        self.model = model
        self.path, self.name = self.model.source.path, name or self.model.source.path.name
        self.arch: Architecture = self.model.arch
        self.type = self.model.source.label()
        self.vocab_size = self.arch.vocab_size
        self.max_context = self.arch.config.get("max_position_embeddings")
        self.device = self.model.device
        self.weights = _CachedWeights(_finite(self.model.source.read, self.path), self.device)

    def tokens(self) -> list[str] | None:
        return hf_tokens(self.path)

    def size_bytes(self) -> int:
        return self.model.source.size_on_disk()

    def bpw(self) -> float:
        stored = self.model.source.tensors()
        return bits_per_weight(sum(t.nbytes for t in stored), sum(t.numel for t in stored))

    def vram(self, ctx: int) -> VramEstimate:
        return vram_checkpoint(self.model, ctx)

    def close(self) -> None:
        self.model.close()


def hf_tokens(folder: Path) -> list[str] | None:
    file = folder / "tokenizer.json"
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(file))
    return [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size(with_added_tokens=True))]


class _GGUFVariant(Variant):
    format = "gguf"

    def __init__(self, path: Path, name: str | None):
        self.path = Path(path)
        self.name = name or self.path.stem
        self.gguf = GGUFFile(self.path)
        self.type = _file_type_name(self.gguf)
        arch = self.gguf.metadata("general.architecture")
        self.max_context = self.gguf.metadata(f"{arch}.context_length")
        token_list = self.gguf.metadata("tokenizer.ggml.tokens")
        embd = self.gguf.tensors.get("token_embd.weight")
        self.vocab_size = embd.shape[0] if embd is not None else len(token_list or [])

    def tokens(self) -> list[str] | None:
        return self.gguf.metadata("tokenizer.ggml.tokens")

    def size_bytes(self) -> int:
        return self.gguf.size_on_disk()

    def bpw(self) -> float:
        tensors = self.gguf.tensors.values()
        return bits_per_weight(sum(t.nbytes for t in tensors), sum(math.prod(t.shape) for t in tensors))

    def vram(self, ctx: int) -> VramEstimate:
        return vram_gguf(self.gguf, ctx)


def _file_type_name(gguf: GGUFFile) -> str:
    from quantkit.formats.gguf.mixtures import file_type_name

    gptq = "-gptq" if gguf.metadata("quantize.gptq.samples") is not None else ""  # levels chosen by GPTQ
    budget = gguf.metadata("quantize.auto.budget")  # gguf:auto: general.file_type only names its main type
    if budget is not None:
        return f"auto{gptq} ({budget})"
    ftype = gguf.metadata("general.file_type")
    return (file_type_name(ftype) or f"ftype {ftype}") + gptq


class TorchGGUFVariant(_TorchForward, _GGUFVariant):
    backend = "torch"

    def __init__(self, path: Path, config: dict, device: str = "cpu", name: str | None = None):
        super().__init__(path, name)
        self.arch = load_architecture(config)
        self.device = torch.device(device)
        self.weights = _CachedWeights(mapping_for(self.arch).weights_from_gguf(_finite(self.gguf.read, self.path)),
                                      self.device)


class LlamaCppVariant(_GGUFVariant):
    backend = "llama.cpp"

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None, name: str | None = None):
        super().__init__(path, name)
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ConfigError("the llama.cpp backend needs llama-cpp-python: pip install llama-cpp-python "
                              "(or use --backend torch)") from None
        self.n_ctx = n_ctx
        self.llm = open_llama(self.path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=True,
                              verbose=False, n_threads=threads or torch.get_num_threads())

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        out = []
        for row in ids.tolist():
            if len(row) > self.n_ctx:
                raise QuantkitError(f"{self.path}: a sequence of {len(row)} tokens exceeds the loaded context "
                                    f"{self.n_ctx}")
            self.llm.reset()
            self.llm.eval(row)
            out.append(self._scores(0, len(row)))
        return torch.stack(out)

    def _scores(self, start: int, stop: int) -> torch.Tensor:
        """Logits rows start..stop-1 of the last eval. llama.cpp computes with whatever the weights hold, so
        non-finite logits are how NaN/Inf weights show; they would make every metric NaN."""
        rows = torch.from_numpy(np.array(self.llm.scores[start:stop], dtype=np.float32))
        if not torch.isfinite(rows).all():
            raise QuantkitError(f"{self.path}: llama.cpp computed NaN/Inf logits: the file's weights hold NaN/Inf "
                                "values (a corrupt file, or converted from a diverged checkpoint); it cannot be "
                                "evaluated")
        return rows

    def choice_logprobs(self, context: list[int], choices: list[list[int]]) -> list[float]:
        """The context is evaluated once; each choice continues from its KV cache (llama-cpp-python's eval
        drops the cache past n_tokens first)."""
        self.llm.reset()
        self.llm.eval(context)
        start = len(context)
        after_context = torch.log_softmax(self._scores(start - 1, start)[0], dim=-1)
        out = []
        for choice in choices:
            self.llm.n_tokens = start
            self.llm.eval(choice)
            rows = self._scores(start, start + len(choice) - 1)
            logprobs = torch.cat((after_context[None], torch.log_softmax(rows, dim=-1)))
            out.append(float(logprobs.gather(-1, torch.tensor(choice)[:, None]).sum()))
        return out

    def close(self) -> None:
        self.llm.close()
        self.llm = None  # released now: Llama.__del__ at interpreter exit fails once ctypes is torn down


def open_variant(path: str | Path, backend: str, *, config: dict | None, n_ctx: int, device: str = "cpu",
                 threads: int | None = None) -> Variant:
    """Open any artifact quantkit reads for scoring. `config`: the baseline's HF config (architecture for the
    torch backend on a GGUF); `n_ctx`: the longest sequence the llama.cpp backend will be given."""
    from quantkit.bundled import resolve_model

    path = resolve_model(str(path))
    if not path.exists():
        raise QuantkitError(f"{path}: no such model file or folder")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if path.suffix != ".gguf":
        if backend == "llama.cpp":
            raise ConfigError(f"{path}: the llama.cpp backend reads GGUF files; use --backend torch for HF folders")
        return HFVariant(Model(path, device=device))
    if backend == "auto":
        backend = "llama.cpp" if has_llama_cpp() else "torch"
    if backend == "llama.cpp":
        return LlamaCppVariant(path, n_ctx, threads)
    if config is None:
        raise ConfigError(f"{path}: the torch backend needs the model's architecture from an HF checkpoint; "
                          "give an HF folder as --baseline, or use --backend llama.cpp")
    return TorchGGUFVariant(path, config, device)


def has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True
