#!/usr/bin/env bash
# The GPU checks of issues 15 and 17 as one run on a lent device machine (an H200 with 16 cores: about 8 minutes),
# prepared and dry-run on a CPU machine, since device time is short (15 minutes a session, every try counted).
#
#   bash bench/device_check.sh --prepare   # here, in the repository root, with the README's venv active:
#                                          # .device/ gets the wheels the device image lacks (gguf, diskcache)
#                                          # and llama-cpp-python's built package (ctypes + its AVX2, no-AMX libs)
#   run(command="bash bench/device_check.sh", carry=[".device"], timeout_s=580)   # the device call
#   DEVICE=cpu SIZE_GB=0.05 METHODS=proxy MODELS=tiny-llama OUT=/tmp/out PY=python \
#       bash bench/device_check.sh                                              # a dry run of the same steps here
#
# Steps, most wanted first, each logged under $OUT whatever the others do (at most 8 files come back):
#   1. bench/quantize_speed.py --device cuda, the peer on every host core, 3 runs (issue 17: GB/s vs
#      llama_model_quantize, tensor data compared);
#   2. the CUDA-marked tests (tests/test_cuda.py and the codecs' CUDA cases): CUDA writes the CPU's bytes;
#   3. gguf:auto's sensitivity measurement on the device, proxy then output, on tiny-llama and tiny-deepseek
#      (issue 15: its GPU time, beside bench/results/sensitivity_proxy.md's CPU times).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
    rm -rf .device && mkdir -p .device/whl .device/site
    python -m pip download -q --no-deps --only-binary=:all: -d .device/whl \
        "gguf==$(python -c 'import importlib.metadata as m; print(m.version("gguf"))')" diskcache==5.6.3 || exit 1
    cp -a "$(python -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))')" .device/site/ || exit 1
    du -sh .device
    exit 0
fi

: "${OUT:?OUT names the folder whose files come back}"
DEVICE=${DEVICE:-cuda}
SIZE_GB=${SIZE_GB:-1}
THREADS=${THREADS:-$(nproc)}
PY=${PY:-python3}  # the device image's python3 holds its CUDA torch
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/qk-site:$PWD
step() { echo "== $(date -u +%T) $*"; }

step setup
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qk-site \
    .device/whl/*.whl || exit 1
cp -a .device/site/llama_cpp /tmp/qk-site/ || exit 1
$PY setup.py -q build_ext --inplace > "$OUT/setup.log" 2>&1 || echo "no C compiler: the torch codecs run" >> "$OUT/setup.log"
{ $PY -c 'import torch, llama_cpp, quantkit.quant.kernels as k; print("torch", torch.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU", "llama_cpp", llama_cpp.__version__)';
  nproc; nvidia-smi -L 2>/dev/null; } >> "$OUT/setup.log" 2>&1

# each step has its own limit (seconds), so a slow one leaves the next its time inside the call's 580 s
step "1. quantize_speed on $DEVICE, $THREADS threads, $SIZE_GB GB"
timeout "${SPEED_S:-240}" $PY bench/quantize_speed.py --device "$DEVICE" --threads "$THREADS" --size-gb "$SIZE_GB" \
    --runs 3 --out "$OUT/quantize_speed_$DEVICE" > "$OUT/quantize_speed.log" 2>&1

step "2. CUDA tests"
timeout "${TESTS_S:-150}" $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/quant 2>&1 \
    | tail -n 40 > "$OUT/cuda_tests.log"

step "3. sensitivity measurement on $DEVICE"
rm -rf /tmp/qk-sens && mkdir -p /tmp/qk-sens  # measured afresh: its seconds are the result
for method in ${METHODS:-proxy output}; do
    for model in ${MODELS:-tiny-llama tiny-deepseek}; do
        timeout "${SENS_S:-35}" $PY -m quantkit.cli convert "$model" --to gguf:auto --target-bpw 4.0 --dry-run --device "$DEVICE" \
            --imatrix "tests/data/llama_imatrix/$model.imatrix.gguf" --sensitivity-method "$method" \
            --sensitivity "/tmp/qk-sens/$model-$method.json" >> "$OUT/sensitivity.log" 2>&1
    done
done
$PY - "$DEVICE" > "$OUT/sensitivity_$DEVICE.json" <<'EOF'
import json, pathlib, sys
times = {p.stem: json.loads(p.read_text())["seconds"] for p in sorted(pathlib.Path("/tmp/qk-sens").glob("*.json"))}
print(json.dumps({"device": sys.argv[1], "measure_s": times}, indent=1))
EOF
step done
