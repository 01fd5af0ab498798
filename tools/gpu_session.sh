#!/usr/bin/env bash
# One prepared GPU session: everything a lent GPU should measure, in one call of under 8 minutes.
#
#   bash tools/gpu_session.sh prepare     # here, with network: the wheels the GPU image lacks, into .whl/
#                                         # (ignored by git; it travels only when `carry` names it)
#   bash tools/gpu_session.sh run         # on the device machine (the device tool's `run`, carry [".whl"])
#
# `run` installs the carried wheels (diffusers and what it needs beyond the image) and this checkout into
# /tmp/site, then, each step under its own time limit so that one failure does not cost the others:
#   1. the GPU tests (pytest -m gpu)                                            ~1 min
#   2. bench_kernels at the FLUX shapes (M 256/1024/4096, no lowered reference)  ~3 min
#   3. a full-size FLUX double + single block, int4 against bf16                 ~1.5 min
#   4. the static model (kernel_model.py, H200 rates) against step 2's times     ~1 min
# and writes every result as <name>-<device>.json under $OUT (the tool brings $OUT back; commit the files to
# bench/results/). The last lines printed are a summary table. Read /work/.library/device/README.md and
# METHOD.md before a session: device time is 15 minutes for all tries together.
set -u -o pipefail
cd "$(dirname "$0")/.."

WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0)

prepare() {
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
}

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its log, never stop the session
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 40
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s"
    SUMMARY+=("$(printf '%-14s exit %3d  %4ds' "$name" "$rc" "$((SECONDS - start))")")
}

run() {
    : "${OUT:?run on the device machine, where the device tool sets OUT}"
    export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . \
        || exit 1
    export PYTHONPATH=/tmp/site
    local device
    device=$(python3 -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv | tee "$OUT/nvidia-smi-$device.txt"
    SUMMARY=()
    # -P: the checkout's svdq_compiler/ folder must not shadow the installed package (codegen/ and passes/ are
    # mapped into it only by the install)
    step gpu-tests 120 python3 -P -m pytest -q -p no:cacheprovider -m gpu tests
    step bench-kernels 240 python3 tools/bench_kernels.py --no-reference --rep-ms 50 \
        --out "$OUT/kernels-$device.json"
    step flux-block 120 python3 tools/bench_flux_block.py --out "$OUT/flux-block-$device.json"
    if [ -f "$OUT/kernels-$device.json" ]; then
        step model-check 90 python3 tools/kernel_model.py --devices H200 --workers 8 \
            --measured "$OUT/kernels-$device.json" --out "$OUT/kernels-model-check-$device.json"
    fi
    echo "== summary ($device)"
    printf '%s\n' "${SUMMARY[@]}"
    ls -la "$OUT"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash tools/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
