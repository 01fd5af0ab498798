#!/usr/bin/env bash
# One prepared GPU session: everything a lent GPU should measure, in one call of under 8 minutes.
#
#   bash tools/gpu_session.sh prepare     # here, with network: the wheels the GPU image lacks and this
#                                         # checkout's own wheel, into .whl/ (ignored by git; it travels only
#                                         # when `carry` names it)
#   bash tools/gpu_session.sh run         # on the device machine (the device tool's `run`, carry [".whl"])
#
# `run` installs the carried wheels into /tmp/site (no build there: the image's setuptools is not ours to rely
# on), then, each step under its own time limit so that one failure does not cost the others:
#   1. at the same time, on the machine's 16 cores: the GPU tests (pytest -m gpu, 4 workers), one warm-up
#      process per FLUX weight shape and format that compiles and tunes every kernel bench_kernels times
#      (Triton and the kernel cache keep them on disk, so step 2 loads instead of compiling), and a first
#      full-size FLUX block compile (its timing is contended and is kept only in the log)       ~3 min
#   2. bench_kernels at the FLUX shapes (M 4096/1024/256, no lowered reference), alone on the GPU ~2 min
#   3. the full-size FLUX double + single block, int4 against bf16, alone on the GPU            ~1.5 min
# and writes <name>-<device>.json under $OUT plus one session log (the tool brings back at most 8 files).
# The static model's check against step 2 (tools/kernel_model.py --measured) runs on the CPU afterwards.
# The last lines printed are a summary table. Read /work/.library/device/README.md and METHOD.md before a
# session: device time is 15 minutes for all tries together.
set -u -o pipefail
cd "$(dirname "$0")/.."

WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0)
FLUX_KN=(3072x3072 3072x9216 3072x12288 12288x3072)

prepare() {
    rm -rf .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" || exit 1
    python3 -m pip wheel --no-deps -q -w .whl . || exit 1
    rm -rf build/lib build/bdist*
    ls -la .whl
}

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its log, never stop the session
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"/tmp/logs/$name.log" 2>&1
    local rc=$?
    {
        echo "===== $name (limit ${limit}s): exit $rc after $((SECONDS - start))s"
        cat "/tmp/logs/$name.log"
    } >>"$LOG"
    echo "== $name: exit $rc after $((SECONDS - start))s"
    tail -n 25 "/tmp/logs/$name.log"
    printf '%-24s exit %3d  %4ds\n' "$name" "$rc" "$((SECONDS - start))" >>/tmp/logs/summary
}

run() {
    : "${OUT:?run on the device machine, where the device tool sets OUT}"
    export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
    export SVDQ_KERNEL_CACHE=/tmp/svdq-kernels TRITON_CACHE_DIR=/tmp/triton-cache
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    mkdir -p /tmp/logs /tmp/warm
    : >/tmp/logs/summary
    local device
    device=$(python3 -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
    LOG=$OUT/session-$device.log
    {
        date -u
        nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu,memory.used --format=csv
        python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
        uptime
    } >>"$LOG" 2>&1
    cat "$LOG"
    # 1. tests, warm-up and a first FLUX block at once (the -P keeps the checkout's svdq_compiler/ folder, whose
    # codegen/ and passes/ the install maps in, from shadowing the installed package)
    step gpu-tests 140 python3 -P -m pytest -q -p no:cacheprovider -n 4 -m gpu --continue-on-collection-errors \
        tests/codegen/test_kernels.py tests/test_graph_record.py tests/test_graph_file.py &
    local kn formats
    for kn in "${FLUX_KN[@]}"; do
        for formats in int4 int8,nvfp4 w4a16; do
            step "warm-$kn-${formats/,/-}" 140 python3 tools/bench_kernels.py --no-reference --no-modulation \
                --rep-ms 2 --m 4096,1024,256 --kn "$kn" --formats "$formats" --out "/tmp/warm/$kn-$formats.json" &
        done
    done
    step warm-modulation 140 python3 tools/bench_kernels.py --no-reference --rep-ms 2 --m 1 --kn 3072x9216 \
        --formats w4a16 --out /tmp/warm/modulation.json &
    # its timing ran beside the warm-up (contended); it comes back in case the timed run below does not finish
    step flux-block-warm 140 python3 tools/bench_flux_block.py --out "$OUT/flux-block-contended-$device.json" &
    wait
    # 2. and 3. alone on the GPU, so that the times are the kernels' own
    step bench-kernels 95 python3 tools/bench_kernels.py --no-reference --rep-ms 50 --m 4096,1024,256 \
        --out "$OUT/kernels-$device.json"
    step flux-block 100 python3 tools/bench_flux_block.py --out "$OUT/flux-block-$device.json"
    {
        echo "===== summary ($device)"
        sort /tmp/logs/summary
        nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv
    } | tee -a "$LOG"
    ls -la "$OUT"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash tools/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
