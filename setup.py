from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class BuildKernels(build_ext):
    """quantkit's compiled codecs (quantkit/quant/_ggml_kernels.c, loaded through ctypes) are optional: without a
    working compiler the install goes on and the torch codecs do the work. Their bytes must not depend on the
    build machine: -O3 but no -march=native, no fused multiply-add (-ffp-contract=off), no -ffast-math."""

    def build_extension(self, ext):
        if self.compiler.compiler_type == "msvc":
            ext.extra_compile_args = ["/O2", "/fp:precise"]
        else:
            ext.extra_compile_args = ["-O3", "-std=c99", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno"]
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - any build failure means: use the torch codecs
            print(f"quantkit: compiled codecs not built ({error}); the torch codecs will be used")


setup(
    name="quantkit",
    version="0.1.0",
    description="Quantize LLM checkpoints (FP8/BF16 safetensors) to GGUF, GPTQ, AWQ and mixed precision, "
    "and measure what each variant costs in quality and saves in VRAM.",
    python_requires=">=3.10",
    packages=find_packages(include=["quantkit", "quantkit.*"]),
    package_data={"quantkit.bundled": ["models/*/*"]},
    # torch is deliberately unpinned here: install `torch==2.13.0` first (see README); a range that the
    # installed build satisfies keeps pip from pulling a CUDA build.
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "numpy>=1.24",
        "gguf>=0.10",
        "click>=8.1",
        "tokenizers>=0.19",
        "matplotlib>=3.7",  # quantkit eval's quality-vs-VRAM plot
        "tqdm>=4.60",  # the CLI's progress bars
        "pyyaml>=6",  # recipes; the model card's front matter
    ],
    # llama-cpp-python is pinned: quantkit's llama.cpp mixture rules follow the llama.cpp it vendors, and the
    # interop tests compare our bytes with that ggml. It builds from source (about 8 minutes on 2 cores).
    # lm-eval (the `quantkit` model type, quantkit.evaluation.lm_eval_backend) is wheels only and needs no torch
    # (about 40 s to install).
    extras_require={
        # sentencepiece trains and checks the SentencePiece test tokenizers; quantkit reads tokenizer.model itself
        # pytest-xdist: the README's test command runs two test files at a time (-n 2 --dist loadfile)
        "test": ["pytest>=7", "pytest-xdist>=3.5", "psutil>=5", "transformers>=4.57", "sentencepiece>=0.2",
                 "llama-cpp-python==0.3.36", "lm-eval==0.4.13", "huggingface_hub>=0.24"],
        "interop": ["transformers>=4.57", "llama-cpp-python==0.3.36"],
        "lm-eval": ["lm-eval==0.4.13"],
        "publish": ["huggingface_hub>=0.24", "pyyaml>=6"],  # quantkit publish (the upload; staging needs neither)
    },
    ext_modules=[Extension("quantkit.quant._ggml_kernels",
                           ["quantkit/quant/_ggml_kernels.c", "quantkit/quant/_ggml_iq2.c",
                            "quantkit/quant/_ggml_iq3.c"],
                           depends=["quantkit/quant/_ggml_kernels.h"], optional=True)],
    cmdclass={"build_ext": BuildKernels},
    entry_points={"console_scripts": ["quantkit=quantkit.cli:main"]},
)
