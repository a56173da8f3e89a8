"""Loading a GGUF in llama-cpp-python without the paths known to crash.

On CPUs with Intel AMX (Sapphire Rapids and later), a llama.cpp built for the machine puts quantized weights in
the AMX extra buffer type, and its AMX matmul segfaults on the first decode (llama.cpp #20824, closed without a
fix): the process dies with signal 11 and no Python error. Weights reach the AMX kernels only through the CPU
backend's extra buffer types, so on such a CPU models are loaded with `use_extra_bufts` off (llama.cpp's
--no-extra-bufts; weight repacking goes with it: slower, same results).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

_AMX_FLAGS = {"amx_tile", "amx_int8", "amx_bf16"}
_log = logging.getLogger(__name__)


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU advertises AMX (Linux /proc/cpuinfo flags); False where there is no such file."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return any(_AMX_FLAGS & set(line.split(":", 1)[1].split())
               for line in text.splitlines() if line.startswith("flags"))


def open_llama(path: str | Path, extra_bufts: bool | None = None, **kwargs):
    """llama_cpp.Llama(path, **kwargs), with the AMX extra buffer type kept out where the CPU has AMX.
    `extra_bufts=False` keeps the extra buffer types out on any CPU (no CPU_REPACK copy of Q4_0/Q4_K/IQ4_NL
    weights: every tensor stays in the mapped model buffer, as quantkit.plan.vram counts it)."""
    import llama_cpp

    if extra_bufts is None:
        extra_bufts = not cpu_has_amx()
        if not extra_bufts:
            _log.warning("%s: loaded without llama.cpp's extra buffer types: this CPU has AMX, and llama.cpp's AMX "
                         "matmul crashes on quantized GGUFs (llama.cpp issue 20824)", path)
    if extra_bufts:
        return llama_cpp.Llama(str(path), **kwargs)
    with _no_extra_bufts(llama_cpp.llama_cpp):
        return llama_cpp.Llama(str(path), **kwargs)


@contextlib.contextmanager
def _no_extra_bufts(bindings):
    """Llama() takes its llama_model_params from llama_model_default_params() and loads the model in the same
    call, with no argument for use_extra_bufts (llama-cpp-python 0.3.36), so the defaults are amended while it
    runs."""
    default = bindings.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    bindings.llama_model_default_params = params
    try:
        yield
    finally:
        bindings.llama_model_default_params = default
