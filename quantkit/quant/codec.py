"""The codec interface and registry. A codec turns float32 rows into ggml's bytes and back; every codec is
vectorised in torch, so the same code runs on CPU and CUDA."""

from __future__ import annotations

from typing import ClassVar

import torch

from quantkit.errors import QuantkitError
from quantkit.quant import kernels

CODECS: dict[str, type[Codec]] = {}


class Codec:
    name: ClassVar[str]  # llama.cpp's type name (GGMLQuantizationType), e.g. "Q4_0"
    type_id: ClassVar[int]  # ggml_type enum value
    block_size: ClassVar[int]  # elements per block
    block_bytes: ClassVar[int]  # bytes per block
    scale_search: ClassVar[bool] = False  # see searches()
    # Encoded only by the compiled kernels (the grid i-quants: scalar, branchy neighbour searches), whatever
    # QUANTKIT_CODEC_IMPL says; CUDA tensors are encoded on CPU. Decoding stays in torch.
    kernel_only: ClassVar[bool] = False
    requires_importance: ClassVar[bool] = False  # ggml asserts an imatrix for the type
    # Set where every element decodes to scale * level_values[L] + offset, with scale and offset from its block's
    # header and L an index stored apart from them: levels() and with_levels() then let a quantizer choose each
    # element's level itself under the header ggml's search chose (quantkit.quant.ggml_gptq). None: the grid
    # i-quants (levels are vectors of 4 or 8 elements) and the float types.
    level_values: ClassVar[tuple[int, ...] | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        CODECS[cls.name] = cls

    @classmethod
    def encode(cls, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [rows, n] (n a multiple of block_size) -> uint8 [rows, n / block_size * block_bytes].

        `importance` is the per-input-column weight vector [n] of an importance matrix (llama.cpp's imatrix
        entry for this tensor); the same vector weights every row, as in ggml_quantize_chunk."""
        rows, n = cls._check(x)
        if importance is not None and importance.shape != (n,):
            raise QuantkitError(f"{cls.name}: importance vector has shape {list(importance.shape)}, "
                                f"expected [{n}] (one value per input column)")
        if cls.requires_importance and importance is None:
            raise QuantkitError(f"{cls.name} needs an importance matrix: pass --imatrix")
        row_bytes = n // cls.block_size * cls.block_bytes
        if cls.kernel_only:
            if not kernels.supports(cls.type_id):
                raise QuantkitError(f"{cls.name} is encoded only by quantkit's compiled codecs, which are not "
                                    "built here: reinstall quantkit with a C compiler, or run `python setup.py "
                                    "build_ext --inplace` in a checkout")
            imp = None if importance is None else importance.cpu()
            return kernels.encode(cls.type_id, x.cpu(), imp, row_bytes).to(x.device)
        if kernels.handles(cls.type_id, x.device):
            return kernels.encode(cls.type_id, x, importance, row_bytes)
        imp = None if importance is None else importance.to(device=x.device, dtype=torch.float32)
        return cls.encode_rows(x.to(torch.float32), imp).reshape(rows, row_bytes)

    @classmethod
    def encode_rows(cls, x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        """Types whose ggml quantizer has an importance-weighted variant override this; the rest (floats,
        Q8_0) ignore importance exactly as ggml does."""
        return cls.encode_blocks(x.reshape(-1, cls.block_size))

    @classmethod
    def searches(cls, importance: torch.Tensor | None) -> bool:
        """Whether encoding on CPU runs one of ggml's scale searches in torch: hundreds of small torch ops per
        chunk, so Python (and its GIL) costs as much as the arithmetic and parallel chunks need processes. False
        where the compiled kernels encode the type: they release the GIL, so threads suffice."""
        return cls._searches(importance) and not kernels.handles(cls.type_id)

    @classmethod
    def _searches(cls, importance: torch.Tensor | None) -> bool:
        return cls.scale_search

    @classmethod
    def decode(cls, data: torch.Tensor, n: int) -> torch.Tensor:
        """uint8 [rows, bytes per row] -> float32 [rows, n]."""
        rows = data.shape[0]
        return cls.decode_blocks(data.reshape(-1, cls.block_bytes)).reshape(rows, n)

    @classmethod
    def levels(cls, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 [blocks, block_bytes] -> (scale, offset, L), each [blocks, block_size]: element e decodes to
        scale[e] * level_values[L[e]] + offset[e] (float32; L int64). Only where level_values is set."""
        raise NotImplementedError

    @classmethod
    def with_levels(cls, data: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        """The blocks `data` with their levels replaced by L [blocks, block_size] (headers kept)."""
        raise NotImplementedError

    @classmethod
    def encode_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def decode_blocks(cls, data: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def _check(cls, x: torch.Tensor) -> tuple[int, int]:
        if x.dim() != 2:
            raise ValueError(f"{cls.name} encodes 2-D [rows, n] tensors, got shape {list(x.shape)}")
        rows, n = x.shape
        if n % cls.block_size:
            raise QuantkitError(f"{cls.name} needs rows whose length is a multiple of {cls.block_size}; "
                                f"got {n}")
        return rows, n


def get_codec(name: str) -> type[Codec]:
    try:
        return CODECS[name.upper()]
    except KeyError:
        raise QuantkitError(f"unknown quantization type {name!r}; valid types: {', '.join(CODECS)}") from None


# ---- bit helpers shared by the block codecs ----------------------------------------------------------------
def f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [blocks, 1] -> its IEEE half (round to nearest even) as 2 little-endian bytes [blocks, 2]."""
    return x.to(torch.float16).view(torch.uint8).reshape(x.shape[0], 2)


def f16_from(data: torch.Tensor) -> torch.Tensor:
    """2 bytes [blocks, 2] -> float32 [blocks, 1]."""
    return data.contiguous().view(torch.float16).to(torch.float32).reshape(-1, 1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[blocks, 32] values 0..15 -> [blocks, 16]: element j in the low nibble, j + 16 in the high one."""
    q = q.to(torch.uint8)
    half = q.shape[1] // 2
    return q[:, :half] | (q[:, half:] << 4)


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def pack_bits_le(bits: torch.Tensor) -> torch.Tensor:
    """[blocks, 8k] of 0/1 -> [blocks, k] bytes, bit i of byte b = element 8b + i."""
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    return (bits.to(torch.uint8).reshape(bits.shape[0], -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits_le(data: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=data.device)
    return ((data[:, :, None] >> shifts) & 1).reshape(data.shape[0], -1)


def divide(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """float32 `t / divisor` rounded once, as C divides, on every device: CUDA turns division by a Python number
    into multiplication by its rounded reciprocal (exact only for powers of two)."""
    return t / torch.tensor(float(divisor), dtype=t.dtype, device=t.device)


_BELOW_HALF = 0.49999997  # the largest float32 below 0.5


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C roundf, exactly: trunc(x + copysign(0.49999997, x)). With 0.5 the sum rounds 0.49999997 up to 1; with the
    float just below it, the float32 result equals roundf for every float32 (checked exhaustively for
    |x| < 2^24; larger floats are integers, which the sum leaves unchanged)."""
    return torch.full_like(x, _BELOW_HALF).copysign_(x).add_(x).trunc_()
