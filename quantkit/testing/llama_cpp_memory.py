"""What llama.cpp itself allocates for a GGUF file at a context: its model, KV cache and compute buffers, read from
its own log while it loads the file (CPU, mmap, no layer offloaded, no extra buffer types, no warmup, no decode).

Meant for files written by quantkit.formats.gguf.writer.write_skeleton (the data section a sparse hole), so a
671B model's table can be checked on a small machine. Two things keep the hole a hole:

* llama.cpp maps the file with MAP_POPULATE and madvise(MADV_WILLNEED) (llama-mmap.cpp), which would fault every
  page in (the kernel zero-fills a hole's pages into the page cache: 400 GB for DeepSeek-V3 at Q4_K_M). A
  subprocess runs with a small LD_PRELOAD shim (compiled here with the system's C compiler) that drops those two
  hints, so nothing reads a weight page; `mapped_resident` reports how much of the file was resident after the
  load. Without a C compiler the load still works, populating the pages (fine for a small model).
* Nothing decodes: llama-cpp-python's Llama() runs no warmup, and the KV cache and compute buffers are sized by
  llama.cpp's graph reservation alone. The KV cache is really allocated (and cleared, so resident): size the
  contexts to the machine.

    python -m quantkit.testing.llama_cpp_memory FILE --ctx 4096 32768 [--kv-type f16]   # one JSON line per ctx
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 1 << 20

_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/mman.h>
#include <sys/types.h>
/* llama.cpp's loader maps GGUF files with MAP_POPULATE and MADV_WILLNEED: both dropped, pages fault on use */
void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    static void *(*real)(void *, size_t, int, int, int, off_t);
    if (!real) real = (void *(*)(void *, size_t, int, int, int, off_t)) dlsym(RTLD_NEXT, "mmap");
    if (fd >= 0) flags &= ~MAP_POPULATE;
    return real(addr, len, prot, flags, fd, off);
}
int madvise(void *addr, size_t len, int advice) {
    static int (*real)(void *, size_t, int);
    if (advice == MADV_WILLNEED) return 0;
    if (!real) real = (int (*)(void *, size_t, int)) dlsym(RTLD_NEXT, "madvise");
    return real(addr, len, advice);
}
int posix_madvise(void *addr, size_t len, int advice) {
    static int (*real)(void *, size_t, int);
    if (advice == POSIX_MADV_WILLNEED) return 0;
    if (!real) real = (int (*)(void *, size_t, int)) dlsym(RTLD_NEXT, "posix_madvise");
    return real(addr, len, advice);
}
"""


def build_shim(folder: Path) -> Path | None:
    """The no-populate shim as a shared library in `folder`, or None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source, library = folder / "no_populate.c", folder / "no_populate.so"
    source.write_text(_SHIM)
    done = subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(library), str(source), "-ldl"],
                          capture_output=True, text=True)
    return library if done.returncode == 0 else None


def parse_log(text: str) -> dict:
    """The sizes llama.cpp logs while loading a model and creating a context, in bytes (its MiB figures have two
    decimals, the compute buffer's check at teardown four)."""

    def mib(value: str) -> int:
        return round(float(value) * MiB)

    out: dict = {"model_buffers": {n: mib(v) for n, v in
                                   re.findall(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB", text)},
                 "kv_buffers": {n: mib(v) for n, v in
                                re.findall(r"llama_kv_cache:\s+(\S+) KV buffer size =\s+([\d.]+) MiB", text)},
                 "compute_buffers": {n: mib(v) for n, v in
                                     re.findall(r"sched_reserve:\s+(\S+) compute buffer size =\s+([\d.]+) MiB", text)},
                 "output_buffers": {n: mib(v) for n, v in
                                    re.findall(r"llama_context:\s+(\S+)\s+output buffer size =\s+([\d.]+) MiB", text)}}
    exact = re.findall(r"(\S+) compute buffer size is\s+([\d.]+) MiB", text)
    if exact:  # the teardown check prints the same figure to 4 decimals
        out["compute_buffers"] = {n: mib(v) for n, v in exact}
    kv = re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers.*?K \((\w+)\):\s*([\d.]+) "
                   r"MiB, V \((\w+)\):\s*([\d.]+) MiB", text)
    if kv is not None:
        out.update(kv_cells=int(kv.group(2)), kv_layers=int(kv.group(3)), k_type=kv.group(4), k=mib(kv.group(5)),
                   v_type=kv.group(6), v=mib(kv.group(7)))
    n_ubatch = re.search(r"llama_context: n_ubatch\s+=\s+(\d+)", text)
    if n_ubatch:
        out["n_ubatch"] = int(n_ubatch.group(1))
    return out


def _mapped_resident(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    target = str(path.resolve())
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", fields[0]):
            inside = fields[-1] == target
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def measure(path: Path, n_ctx: int, kv_type: str = "f16", n_ubatch: int = 512) -> dict:
    """Load `path` in this process (llama-cpp-python, through quantkit's guard with the extra buffer types off) at
    context `n_ctx` and return llama.cpp's figures (parse_log) with llama_model_size and the resident mapped bytes."""
    import llama_cpp

    from quantkit.evaluation.llama_cpp_guard import open_llama
    from quantkit.testing.ggml_reference import llama_log

    ggml_type = getattr(llama_cpp, f"GGML_TYPE_{kv_type.upper()}")
    with llama_log() as chunks:
        llm = open_llama(path, extra_bufts=False, n_ctx=n_ctx, n_batch=n_ubatch, n_ubatch=n_ubatch, n_gpu_layers=0,
                         use_mmap=True, use_mlock=False, logits_all=False, type_k=ggml_type, type_v=ggml_type,
                         n_threads=1, verbose=True)
        try:
            result = {"n_ctx": n_ctx, "kv_type": kv_type, "model_size": llama_cpp.llama_model_size(llm.model),
                      "mapped_resident": _mapped_resident(path)}
        finally:
            llm.close()
    result.update(parse_log("".join(chunks)))
    return result


def measure_in_subprocess(path: Path, contexts: list[int], kv_type: str = "f16", timeout: float = 1800) -> list[dict]:
    """`measure` for each context in a child process (the no-populate shim preloaded where it can be built), so the
    mapping and the KV cache are gone when it returns. Each result notes whether the shim was used."""
    with tempfile.TemporaryDirectory(prefix="quantkit-llama-mem-") as tmp:
        shim = build_shim(Path(tmp))
        env = dict(os.environ)
        if shim is not None:
            env["LD_PRELOAD"] = f"{shim} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(shim)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
        done = subprocess.run([sys.executable, "-m", "quantkit.testing.llama_cpp_memory", str(path), "--kv-type",
                               kv_type, "--ctx", *map(str, contexts)], capture_output=True, text=True, env=env,
                              timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"llama.cpp could not load {path} (rc {done.returncode}):\n{done.stderr[-4000:]}")
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for r in results:
        r["no_populate_shim"] = shim is not None
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--ctx", type=int, nargs="+", required=True)
    parser.add_argument("--kv-type", default="f16")
    args = parser.parse_args(argv)
    for n_ctx in args.ctx:
        print(json.dumps(measure(args.path, n_ctx, args.kv_type)), flush=True)


if __name__ == "__main__":
    main()
