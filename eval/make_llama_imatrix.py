"""Golden files from llama.cpp's own CLI tools, for tests that cannot build them (tests/data/llama_imatrix/).

For each bundled model: quantkit writes its F32 GGUF; llama-imatrix computes the importance matrix of the
first CHARS characters of the bundled calibration text (GGUF, and legacy .dat for one model); llama-quantize
quantizes the F32 GGUF to the issue's byte-exact types, with and without that imatrix, and a digest of each
output's tensor data is recorded.
manifest.json keeps what the tests need to know the inputs are unchanged (text and weight digests).

Build the tools from the llama.cpp that llama-cpp-python 0.3.36 vendors (its sdist), about 5 min on 2 cores:
    cmake -S vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \\
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build build -j2 --target llama-imatrix llama-quantize
then: python -m eval.make_llama_imatrix --bin build/bin
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

from quantkit import convert as api
from quantkit.bundled import MODEL_NAMES, MODELS_DIR, textsets
from quantkit.testing.ggml_reference import tensor_data_digest

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "llama_imatrix"
CHARS = 60_000
CTX = 128
CHUNKS = 8
TYPES = ["Q4_K_M", "Q3_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "IQ4_XS", "Q2_K"]
DAT_MODEL = "tiny-qwen2"


def calibration_text() -> str:
    return textsets.text("calibration")[:CHARS]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", type=Path, required=True, help="folder with llama-imatrix and llama-quantize")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    text = calibration_text()
    manifest = {"ctx": CTX, "chunks": CHUNKS, "calibration_chars": CHARS, "calibration_sha256": text_digest(text),
                "llama_cpp": "vendored by llama-cpp-python 0.3.36", "models": {}}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "calibration.txt").write_text(text, encoding="utf-8")
        for name in MODEL_NAMES:
            folder = MODELS_DIR / name
            [(f32, _)] = api.convert(folder, ["gguf:F32"], tmp / f"{name}-f32.gguf")
            imatrix = args.out / f"{name}.imatrix.gguf"
            formats = [("gguf", imatrix)] + ([("dat", args.out / f"{name}.imatrix.dat")] if name == DAT_MODEL else [])
            for fmt, path in formats:
                # run where the text is, so the file records the dataset as "calibration.txt" on every run
                _run([str(args.bin / "llama-imatrix"), "-m", str(f32), "-f", "calibration.txt", "-c", str(CTX),
                      "--chunks", str(CHUNKS), "--no-ppl", "-t", "2", "--output-format", fmt, "-o", str(path)], tmp)
            entry = {"weights_sha256": weights_digest(folder)}
            for key, flags in (("llama_quantize", []), ("llama_quantize_imatrix", ["--imatrix", str(imatrix)])):
                entry[key] = {}
                for type_name in TYPES:
                    out = tmp / f"{name}-{type_name}.gguf"
                    _run([str(args.bin / "llama-quantize"), *flags, str(f32), str(out), type_name, "2"], tmp)
                    entry[key][type_name] = tensor_data_digest(out)
            manifest["models"][name] = entry
            print(name, "done")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
