#!/usr/bin/env bash
# The JVP/kernel checks on a lent GPU machine, as one script: each stage under its own timeout, its log and
# JSON under $OUT (default /tmp/gpu_check). Run from the repository root:
#
#   bash benchmarks/gpu_check.sh                    # every stage
#   STAGES="tests attention" bash benchmarks/gpu_check.sh
#   CPU=1 STAGES="jvp train" bash benchmarks/gpu_check.sh    # tiny sizes on the CPU (a dry run of the script)
#
# Stages: tests (pytest -m gpu on kernels and models), attention (benchmarks/attention_jvp.py, bf16, L 1k/4k/16k,
# D 64/128), jvp (benchmarks/jvp_backends.py on full SDXL and SD3 at 1024 px, batch 2, bf16), train (a short
# benchmarks/diffusers_train.py sCM run on full SDXL, LoRA 64, checkpointing, bf16; its row names the JVP backend),
# sample (benchmarks/sample_speed.py: fewstep against stock diffusers on full SDXL at 1024 px, 1 and 4 steps),
# breakdown (benchmarks/diffusers_train.py --breakdown on full SDXL, LoRA 64 + checkpointing, bf16, TDM first),
# tdm (TDM's s/iteration on full SDXL, the setup of the 4.06 s).
# BUNDLE=1 packs the logs and JSON into $OUT/gpu_check.tar.gz (beside summary.txt), for a device run that may bring
# back only a few files.
# diffusers is not installed on the GPU machine: a wheel in .whl/ (see ../shared/ENVIRONMENT.md) is installed
# into /tmp/site first when diffusers does not import.
set -u
OUT=${OUT:-/tmp/gpu_check}
STAGES=${STAGES:-"tests attention jvp train sample breakdown tdm"}
CPU=${CPU:-0}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ! $PY -c "import diffusers" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl
    fi
    export PYTHONPATH="/tmp/site:$PWD:$PWD/kernels:${PYTHONPATH:-}"
else
    export PYTHONPATH="$PWD:$PWD/kernels:${PYTHONPATH:-}"
fi

status=0
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
    [ $rc -eq 0 ] || status=1
}

for s in $STAGES; do
    case $s in
    tests)
        stage tests 300 $PY -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/models tests/sampling \
            tests/training ;;
    attention)
        if [ "$CPU" = 1 ]; then
            stage attention 120 $PY benchmarks/attention_jvp.py --cpu-smoke --out "$OUT/attention_jvp.json"
        else
            stage attention 240 $PY benchmarks/attention_jvp.py --seq 1024 4096 16384 --head-dims 64 128 \
                --out "$OUT/attention_jvp.json"
        fi ;;
    jvp)
        if [ "$CPU" = 1 ]; then
            stage jvp 300 $PY benchmarks/jvp_backends.py --arch sdxl sd3 --size tiny --dtype bf16 --repeats 1 \
                --out "$OUT/jvp_backends.json"
        else
            stage jvp 420 $PY benchmarks/jvp_backends.py --arch sdxl sd3 --size full --dtype bf16 --device cuda \
                --batch 2 --repeats 3 --out "$OUT/jvp_backends.json"
        fi ;;
    train)
        if [ "$CPU" = 1 ]; then
            stage train 300 $PY benchmarks/diffusers_train.py --cpu-smoke --method scm --out "$OUT/train_scm.json"
        else
            stage train 420 $PY benchmarks/diffusers_train.py --method scm --arch sdxl --size full --resolution 1024 \
                --sweep lora64+ckpt --iters 8 --warmup 3 --batch-size 1 --mixed-precision bf16 \
                --out "$OUT/train_scm.json"
        fi ;;
    sample)
        if [ "$CPU" = 1 ]; then
            stage sample 300 $PY benchmarks/sample_speed.py --size tiny --steps 1 --repeats 3 --out "$OUT/sample_speed.json"
        else
            stage sample 420 $PY benchmarks/sample_speed.py --arch sdxl --size full --steps 1 4 --repeats 10 \
                --out "$OUT/sample_speed.json"
        fi ;;
    breakdown)
        if [ "$CPU" = 1 ]; then
            stage breakdown 300 $PY benchmarks/diffusers_train.py --breakdown --size tiny --methods tdm,scm \
                --sweep lora4+ckpt --repeats 2 --warmup 1 --device cpu --out "$OUT/breakdown.json"
        else
            stage breakdown 540 $PY benchmarks/diffusers_train.py --breakdown --arch sdxl --size full --resolution 1024 \
                --methods tdm,cd,lcm,dmd2,scm --sweep lora64+ckpt --mixed-precision bf16 --batch-size 1 --repeats 3 \
                --warmup 2 --out "$OUT/breakdown.json"
        fi ;;
    tdm)
        if [ "$CPU" = 1 ]; then
            stage tdm 300 $PY benchmarks/diffusers_train.py --cpu-smoke --method tdm --out "$OUT/train_tdm.json"
        else
            stage tdm 420 $PY benchmarks/diffusers_train.py --method tdm --arch sdxl --size full --resolution 1024 \
                --sweep lora64+ckpt --iters 20 --warmup 5 --batch-size 1 --mixed-precision bf16 \
                --out "$OUT/train_tdm.json"
        fi ;;
    *)
        echo "unknown stage $s (tests, attention, jvp, train, sample, breakdown, tdm)"; status=2 ;;
    esac
done
if [ "${BUNDLE:-0}" = 1 ]; then
    ( cd "$OUT" && tar -czf /tmp/gpu_check.tar.gz --exclude=summary.txt --exclude=gpu_check.tar.gz . \
        && find . -type f ! -name summary.txt -delete && mv /tmp/gpu_check.tar.gz . )
fi
exit $status
